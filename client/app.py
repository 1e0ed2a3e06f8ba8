"""fedseg ClientApp: query / train / evaluate handlers; wiring only (work is in trainer.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedseg.client.audit import outbox_audit_mod
from fedseg.client.client_level_dp import client_level_clipping_mod
from fedseg.client.privacy import PrivacyLedger, admit, check_dp_compatible, plan_round
from fedseg.client.instance_trainer import evaluate_instances, train_instances
from fedseg.client.site import SiteLocation, resolve_site
from fedseg.client.state import SiteState
from fedseg.client.trainer import adapt_norm_statistics, evaluate_local, train_local
from fedseg.common.config import RunConfig, keys
from fedseg.common.data import (DataError, SiteSpec, case_seed, check_site, image_channels,
                               read_site, split_training)
from fedseg.common.models import ModelSpec, build_model, local_keys, split_state
from fedseg.common.records import (ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PrivacyBoundaryError,
                                   scalar_metrics, shared_record, to_state)
from fedseg.common.weights import load_pretrained

log = logging.getLogger(__name__)
SITE_ERROR = 3100  # Flower error code for a site that refuses a message with a clear reason

app = ClientApp(mods=[outbox_audit_mod, client_level_clipping_mod])  # audit sees the final reply


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report the site's data-contract status and dataset shape (metadata only, no file names)."""
    return _guarded(msg, context, _describe_site)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global shared weights + this site's local layers on its training split."""
    return _guarded(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the model this site would use (global shared + own local layers) on its validation split."""
    return _guarded(msg, context, _evaluate)


def _guarded(msg: Message, context: Context,
             handler: Callable[[Message, SiteLocation, dict], RecordDict]) -> Message:
    config = dict(msg.content[CONFIG]) if CONFIG in msg.content.config_records else {}
    try:
        site = resolve_site(dict(context.node_config), config)
        return Message(handler(msg, site, config), reply_to=msg)
    except (ValueError, PrivacyBoundaryError, FloatingPointError, RuntimeError) as err:
        log.error("%s", err)
        return Message(Error(code=SITE_ERROR, reason=str(err).splitlines()[0]), reply_to=msg)


def _describe_site(msg: Message, site: SiteLocation, config: dict) -> RecordDict:
    problems = check_site(site.ref.site_dir)
    if problems:
        for problem in problems:  # full detail stays in the site's own log
            log.error("site %s: %s", site.ref.name, problem)
        return RecordDict({CONFIG: ConfigRecord({"site": site.ref.name, "problems": len(problems)})})
    spec = read_site(site.ref, seed=int(config.get("seed", 0)))
    train, val = split_training(spec, float(config.get("val-fraction", 0.25)), int(config.get("seed", 0)))
    in_channels = image_channels(spec)
    return RecordDict({CONFIG: ConfigRecord({
        "site": site.ref.name, "problems": 0, "spatial-dims": spec.spatial_dims,
        "in-channels": in_channels, "num-classes": spec.num_classes, "task": spec.task,
        "label-names": [spec.labels.get(i, str(i)) for i in range(spec.num_classes)],
        "num-train": len(train) if spec.training else 0, "num-val": len(val),
    })})


@dataclass
class _Round:
    """A site's model for this round: global shared weights + its own local layers."""

    cfg: RunConfig
    spec: SiteSpec
    model: nn.Module
    local: set[str]
    state: SiteState
    shared: dict[str, torch.Tensor]


def _prepare(msg: Message, site: SiteLocation, config: dict) -> _Round:
    run_keys = set(keys())  # Flower adds its own keys (server-round, clipping_norm): read ours only
    cfg = RunConfig.from_dict({k: v for k, v in config.items() if k in run_keys})
    mspec = ModelSpec.for_run(cfg, int(config["model-spatial-dims"]), int(config["model-in-channels"]),
                              int(config["model-out-channels"]))
    spec = read_site(site.ref, seed=cfg.seed)
    if spec.spatial_dims != mspec.spatial_dims:
        raise DataError(f"site {spec.name} has spatial_dims={spec.spatial_dims}, the run trains "
                        f"a {mspec.spatial_dims}D model")
    if cfg.model == "maskrcnn" and spec.task != "instance":
        raise DataError(f"site {spec.name} is a '{spec.task}' site; model=maskrcnn needs task=instance")
    model = build_model(mspec)
    local = local_keys(model, cfg.local_layers)
    state = SiteState(site.state_dir)
    saved = state.load_local_layers()
    if saved:
        model.load_state_dict(saved, strict=False)
    elif site.pretrained:  # until the site has its own local layers, its file fills them
        load_pretrained(model, site.pretrained)
    shared = to_state(msg.content[ARRAYS], keep=set(model.state_dict()) - local)
    model.load_state_dict(shared, strict=False)
    return _Round(cfg, spec, model, local, state, shared)


def _train(msg: Message, site: SiteLocation, config: dict) -> RecordDict:
    r = _prepare(msg, site, config)
    cfg, spec, model = r.cfg, r.spec, r.model
    server_round = int(config["server-round"])
    train_cases, _ = split_training(spec, cfg.val_fraction, cfg.seed)
    if not train_cases:
        raise DataError(f"site {spec.name} has no training cases (held-out sites only evaluate)")
    plan, ledger = None, None
    if cfg.dp == "sample":
        if cfg.model == "unet":  # Mask R-CNN's DP is per-case clipping, no per-layer samplers
            check_dp_compatible(model)
        ledger = PrivacyLedger(site.state_dir)
        plan = plan_round(cfg, len(train_cases), ledger)
    admit(site.policy, cfg.dp, plan, ledger, spec.name)  # before any training
    train = train_instances if cfg.model == "maskrcnn" else train_local
    result = train(
        model, spec, train_cases, epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        patch_size=cfg.patch_size, seed=case_seed(cfg.seed, spec.name, server_round),
        proximal_mu=float(config.get("proximal-mu", 0.0)) if cfg.strategy == "fedprox" else 0.0,
        global_params=r.shared, device=site.device,
        dp=(plan, ledger, server_round) if plan else None,
    )
    new_shared, new_local = split_state(model, r.local)
    r.state.save_local_layers(new_local, server_round)
    log.info("site %s round %d: loss %.4f over %d cases, %d steps", spec.name, server_round,
             result.loss, result.num_examples, result.steps)
    metrics = {"train-loss": result.loss, NUM_EXAMPLES: result.num_examples, "steps": result.steps}
    if plan is not None:
        metrics |= {"epsilon": result.epsilon, "delta": plan.delta,
                    "noise-multiplier": plan.noise_multiplier}
    return RecordDict({ARRAYS: shared_record(new_shared, r.local), METRICS: scalar_metrics(metrics)})


def _evaluate(msg: Message, site: SiteLocation, config: dict) -> RecordDict:
    r = _prepare(msg, site, config)
    _, val_cases = split_training(r.spec, r.cfg.val_fraction, r.cfg.seed)
    evaluate = evaluate_instances if r.cfg.model == "maskrcnn" else evaluate_local
    scores = evaluate(r.model, r.spec, val_cases, patch_size=r.cfg.patch_size,
                      device=site.device, min_group_cases=r.cfg.min_group_cases)
    if r.spec.name in r.cfg.heldout_sites:  # an unseen hospital: also score after adapting norms
        adapted = scores  # no BatchNorm to adapt: the adapted model is the plain one
        if adapt_norm_statistics(r.model, r.spec, val_cases, patch_size=r.cfg.patch_size,
                                 seed=r.cfg.seed, device=site.device):
            adapted = evaluate(r.model, r.spec, val_cases, patch_size=r.cfg.patch_size,
                               device=site.device, min_group_cases=r.cfg.min_group_cases)
        scores |= {f"tta-{k}": v for k, v in adapted.items() if not k.startswith("group-")}
    return RecordDict({METRICS: scalar_metrics({**scores, NUM_EXAMPLES: len(val_cases)})})
