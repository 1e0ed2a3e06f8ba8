"""fedseg ClientApp: query / train / evaluate handlers; wiring only (the work is in site.py,
site_model.py, tasks.py, trainer.py and privacy.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedseg.client.adaptation import adapt_to_site, site_images
from fedseg.client.audit import outbox_audit_mod
from fedseg.client.client_level_dp import client_level_clipping_mod
from fedseg.client.local_curves import write_local_curves
from fedseg.client.memory import release_freed_memory
from fedseg.client.packing import weight_packing_mod
from fedseg.client.privacy import DPSession, admit
from fedseg.client.redaction import redaction_mod
from fedseg.client.site import SiteLocation, describe_site, resolve_site, site_device
from fedseg.client.site_model import round_model
from fedseg.client.site_policy import admit_model, admit_workload
from fedseg.client.state import SiteState, run_key
from fedseg.client.step_timing import seconds_per_step
from fedseg.client.tasks import task_for
from fedseg.client.trainer import round_steps, train_local
from fedseg.common.round_config import SiteData, SiteRoundConfig
from fedseg.common.data import Case, DataError, SiteSpec, case_seed, read_site, split_training
from fedseg.common.logs import setup_logging
from fedseg.common.models import ensemble_members, split_state, unseen_norm_set
from fedseg.common.precision import site_precision
from fedseg.common.plan import FINGERPRINT
from fedseg.common.records import (ARRAYS, CONFIG, EVAL_PREFIX, METRICS, NUM_EXAMPLES, SECONDS_PER_STEP, SITE_ERROR,
                                   TIME_STEPS, PrivacyBoundaryError, received_state, scalar_metrics,
                                   shared_record)

log = logging.getLogger(__name__)

# mods run outermost first: the audit logs the reply as it leaves, after redaction (tensor by
# tensor: packing, when the server asks for it, only joins them into one array per dtype)
app = ClientApp(mods=[weight_packing_mod, outbox_audit_mod, redaction_mod, client_level_clipping_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the site's data-contract status and dataset shape (metadata only, no file names),
    or, asked with ``time-steps``, the seconds a training step of the run's network takes here."""
    return _guarded(msg, context, _time_steps if TIME_STEPS in msg.content[CONFIG] else _describe)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global shared weights + this site's local layers on its training split."""
    return _guarded(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the model this site would use (global shared + own local layers) on its validation split."""
    return _guarded(msg, context, _evaluate)


def _guarded(msg: Message, context: Context,
             handler: Callable[[Message, dict], RecordDict]) -> Message:
    setup_logging()  # the site's lines in its SuperNode's output (or, simulated, the driver's)
    try:
        return Message(handler(msg, dict(context.node_config)), reply_to=msg)
    except (ValueError, PrivacyBoundaryError, FloatingPointError, RuntimeError) as err:
        log.error("%s", err)
        return Message(Error(code=SITE_ERROR, reason=str(err).splitlines()[0]), reply_to=msg)
    except OSError as err:  # e.g. a full or read-only state dir: every state file is replaced atomically
        log.error("a file at this site could not be read or written: %s", err)
        return Message(Error(code=SITE_ERROR, reason=f"a file at the site could not be read or written ({err})"),
                       reply_to=msg)
    finally:  # a simulated site's process answers many messages: what this one freed goes back
        release_freed_memory()


def _describe(msg: Message, node_config: dict) -> RecordDict:
    data = SiteData.from_record(msg.content[CONFIG])
    site = resolve_site(node_config, data)
    info, problems = describe_site(site, data, fingerprint=bool(msg.content[CONFIG].get(FINGERPRINT, False)))
    for problem in problems:  # full detail stays in the site's own log
        log.error("site %s: %s", site.ref.name, problem)
    return RecordDict({CONFIG: ConfigRecord(info)})


def _time_steps(msg: Message, node_config: dict) -> RecordDict:
    cfg, site, _, device = _open_round(msg, node_config)
    spec, cases, _ = _training_split(cfg, site)
    # a site times only what it would train: a round its policy refuses is not timed either
    admit(site.policy, cfg.dp, None, None, spec.name)
    admit_workload(site.policy, cfg, round_steps(len(cases), cfg.batch_size, cfg.local_epochs, None), 0, spec.name)
    return RecordDict({CONFIG: ConfigRecord({SECONDS_PER_STEP: seconds_per_step(cfg, spec, cases, device)})})


def _open_round(msg: Message, node_config: dict) -> tuple[SiteRoundConfig, SiteLocation, int, str]:
    cfg = SiteRoundConfig.from_record(msg.content[CONFIG])
    site = resolve_site(node_config, cfg.data)
    return cfg, site, int(msg.content[CONFIG]["server-round"]), site_device(site, cfg.device)


def _training_split(cfg: SiteRoundConfig, site: SiteLocation) -> tuple[SiteSpec, list[Case], list[Case]]:
    spec = read_site(site.ref, seed=cfg.data.seed, target_spacing=cfg.spacing)
    cases, val_cases = split_training(spec, cfg.data.val_fraction, cfg.data.seed)
    if not cases:
        raise DataError(f"site {spec.name} has no training cases (held-out sites only evaluate)")
    return spec, cases, val_cases


def _train(msg: Message, node_config: dict) -> RecordDict:
    opened = _open_round(msg, node_config)
    cfg, site, server_round, _ = opened
    spec, cases, val_cases = _training_split(cfg, site)
    # the site's policy admits the round before anything runs (a DP round holds the site's ledger)
    dp = DPSession.open(cfg.dp, site.policy, site.state_dir, num_cases=len(cases),
                        batch_size=cfg.batch_size, epochs=cfg.local_epochs,
                        run=run_key(cfg.run_name, cfg.run_id), server_round=server_round,
                        site=spec.name, lr_factor=cfg.lr_factor(server_round))
    try:
        return _train_admitted(msg, opened, spec, cases, val_cases, dp)
    finally:
        if dp is not None:
            dp.release()  # a round refused or failed after its plan; a finished one released it already


def _train_admitted(msg: Message, opened: tuple[SiteRoundConfig, SiteLocation, int, str], spec: SiteSpec,
                    cases: list[Case], val_cases: list[Case], dp: DPSession | None) -> RecordDict:
    cfg, site, server_round, device = opened
    state = SiteState(site.state_dir)
    counting = site.policy.max_rounds_per_day is not None  # rounds a day are counted where limited
    admit_workload(site.policy, cfg, round_steps(len(cases), cfg.batch_size, cfg.local_epochs, dp),
                   state.rounds_trained_today() if counting else 0, spec.name)
    # the local layers as they were before this round, even if it runs again after a crash
    mine = round_model(cfg, site, received_state(msg.content[ARRAYS]), server_round - 1)
    task = task_for(cfg.model)
    scores = {}
    if cfg.evaluate_in_train:  # the server asks: what last round's evaluation message would score
        started = time.perf_counter()
        with site_precision(cfg.amp, device, deterministic=cfg.deterministic).autocast():
            scores = task.evaluate(mine.model, spec, val_cases, patch_size=cfg.patch_size, device=device,
                                   min_group_cases=site.policy.group_threshold(cfg.min_group_cases))
        scores |= {NUM_EXAMPLES: len(val_cases), "seconds-score": time.perf_counter() - started}
    result = train_local(
        mine.model, task, spec, cases, epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        lr=cfg.round_lr(server_round), patch_size=cfg.patch_size,
        seed=case_seed(cfg.data.seed, spec.name, server_round),
        proximal_mu=cfg.proximal_mu, global_params=mine.shared, device=device, dp=dp, augment=cfg.augment,
        cache_mb=cfg.data.site_cache_mb, flips=cfg.flip_axes, compile_step=cfg.compile,
        step_memory_mb=cfg.step_memory_mb, precision=site_precision(cfg.amp, device, dp=dp is not None, deterministic=cfg.deterministic))
    mine.save_local_layers(server_round)
    if counting:
        state.note_round_trained()
    if site.tensorboard:
        write_local_curves(state.run(cfg.run_name, cfg.run_id).path, server_round, result,
                           {k: v for k, v in scores.items() if k != NUM_EXAMPLES})
    log.info("site %s round %d: loss %.4f over %d cases, %d steps", spec.name, server_round,
             result.loss, result.num_examples, result.steps)
    metrics = {"train-loss": result.loss, NUM_EXAMPLES: result.num_examples, "steps": result.steps,
               "cuda": float(device.startswith("cuda")), "threads": torch.get_num_threads(),
               "seconds-train": result.seconds,
               "seconds-data": result.data_seconds}
    if dp is not None:
        metrics |= {"epsilon": result.epsilon, "delta": dp.plan.delta,
                    "noise-multiplier": dp.plan.noise_multiplier, "dp-lr": dp.training.lr}
    metrics |= {EVAL_PREFIX + k: v for k, v in scores.items()}
    shared, _ = split_state(mine.model, mine.local)
    if cfg.local_layers == "norm":  # a copy of the norms for the unseen-site set (never sent back here)
        shared |= unseen_norm_set(mine.model.state_dict(), mine.local)
    return RecordDict({ARRAYS: shared_record(shared, mine.local, cfg.transfer_dtype),
                       METRICS: scalar_metrics(metrics)})


def _evaluate(msg: Message, node_config: dict) -> RecordDict:
    cfg, site, server_round, device = _open_round(msg, node_config)
    spec = read_site(site.ref, seed=cfg.data.seed, target_spacing=cfg.spacing)
    admit_model(site.policy, cfg, spec.name)
    _, cases = split_training(spec, cfg.data.val_fraction, cfg.data.seed)
    received, earlier = ensemble_members(received_state(msg.content[ARRAYS]))
    model = round_model(cfg, site, received, server_round).model
    task = task_for(cfg.model)
    options = dict(patch_size=cfg.patch_size, device=device,
                   min_group_cases=site.policy.group_threshold(cfg.min_group_cases))
    precision = site_precision(cfg.amp, device, deterministic=cfg.deterministic)
    started = time.perf_counter()
    with precision.autocast():
        scores = task.evaluate(model, spec, cases, **options)
        if earlier and spec.name in cfg.heldout_sites:  # also the ensemble of the last rounds' models
            members = [round_model(cfg, site, state, server_round).model for state in earlier]
            combined = task.evaluate(model, spec, cases, **options, ensemble=members)
            scores |= {f"ensemble-{k}": v for k, v in combined.items() if not k.startswith("group-")}
            scores["ensemble-models"] = 1 + len(members)
    scores["seconds-score"] = time.perf_counter() - started
    # an unseen hospital: also score after adapting its norms, in the rounds the server asks for
    if spec.name in cfg.heldout_sites and cfg.adapt_heldout:
        started = time.perf_counter()
        # nothing applies to a model without BatchNorm and per-pixel classes (Mask R-CNN)
        if adapt_to_site(model, task, site_images(spec, cases), patch_size=cfg.patch_size,
                         seed=cfg.data.seed, device=device):
            with precision.autocast():
                adapted = task.evaluate(model, spec, cases, **options)
            scores |= {f"tta-{k}": v for k, v in adapted.items() if not k.startswith("group-")}
            scores["seconds-adapt"] = time.perf_counter() - started
    return RecordDict({METRICS: scalar_metrics({**scores, NUM_EXAMPLES: len(cases)})})
