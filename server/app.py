"""fedseg ServerApp: the federation in named steps — open (or resume) the run, discover the
sites, build the initial model, run the rounds, finalize (global model, summary, report)."""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedseg.common.config import MODEL_KINDS, ModelSpec, RunConfig, SiteRoundConfig
from fedseg.common.data import flip_axes
from fedseg.common.logs import setup_logging
from fedseg.common.dp_recipe import (NO_WARM_START, describe, dp_training, ema_decay, fit_to_noise,
                                     noise_to_signal, plan_round, warning)
from fedseg.common.models import UNSEEN_PREFIX, build_model, local_keys, split_state, unseen_norm_set
from fedseg.common.records import shared_record
from fedseg.common.weights import load_pretrained
from fedseg.server.checkpoints import save_global_model
from fedseg.server.discovery import discover_sites, model_for_sites, site_names
from fedseg.server.model_average import ModelAverage
from fedseg.server.report import write_report
from fedseg.server.rounds import RoundLog, RoundRecorder
from fedseg.server.run_folder import OpenRun, now, open_run, versions
from fedseg.server.strategies import build_strategy, score_start
from fedseg.server.summary import below_pretrained, site_spread, summarize

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: the run config comes from pyproject + ``--run-config``;
    fedseg's round lines go to the ServerApp's output, which ``flwr run --stream`` shows."""
    setup_logging(quiet_flower=False)
    run_federation(grid, RunConfig.from_dict(dict(context.run_config)))


@dataclass
class Federation:
    """What the steps hand on: the sites, the model, and the initial shared weights."""

    sites: dict[int, dict[str, Any]]
    site_of: dict[int, str]
    heldout_nodes: set[int]
    training_sites: list[str]
    spec: ModelSpec
    local: set[str]
    shared: dict[str, torch.Tensor]
    flip_axes: tuple[int, ...]

    def checkpoint_meta(self, run: OpenRun) -> dict[str, Any]:
        """What every checkpoint carries beside the weights (see ``checkpoints.META_KEYS``)."""
        return {"model": self.spec.to_dict(), "local_layers": run.cfg.local_layers,
                "local_keys": sorted(self.local), "patch_size": run.cfg.patch_size,
                "flip_axes": list(self.flip_axes),
                "run_name": run.cfg.run_name, "run_id": run.run_id}


def run_federation(grid: Grid, cfg: RunConfig) -> Path:
    """Run (or resume) a whole federated study over the sites connected to ``grid``.

    Returns:
        The run folder (ARCHITECTURE §7).
    """
    run = open_run(cfg)
    random.seed(run.cfg.seed)  # Flower samples nodes with `random`
    sites = discover_sites(grid, run.cfg, run.cfg.site_data(sim_state_root(run)))
    fed = initial_model(run, sites)
    final = run_rounds(grid, run, fed)
    return finalize(run, fed, final)


def initial_model(run: OpenRun, sites: dict[int, dict[str, Any]]) -> Federation:
    """Build the seeded initial model (or the checkpoint's, on resume), loading the server's own
    pretrained file into a new run; write run.json."""
    cfg = run.cfg
    site_of, heldout, training = site_names(sites, cfg)
    spec = model_for_sites(cfg, sites)
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    pretrained = None
    if run.start_state is not None:
        model.load_state_dict(run.start_state, strict=False)
    elif cfg.pretrained_weights:
        pretrained = load_pretrained(model, cfg.pretrained_weights)
    local = local_keys(model, spec, cfg.local_layers)
    shared, _ = split_state(model, local)
    if cfg.local_layers == "norm":  # the unseen-site norm set: from the checkpoint, or the initial norms
        shared |= ({k: v for k, v in run.start_state.items() if k.startswith(UNSEEN_PREFIX)}
                   if run.start_state is not None else unseen_norm_set(model.state_dict(), local))
    flips = flip_axes(cfg.flips, spec.spatial_dims, [str(i.get("modality", "")) for i in sites.values()])
    log.info("training patches are mirrored %s (run-config flips=%s)",
             f"at random along axes {', '.join(map(str, flips))}" if flips else "along no axis", cfg.flips)
    fed = Federation(sites, site_of, heldout, training, spec, local, shared, flips)
    dp_plans = None
    if cfg.dp == "sample":  # a fresh warm run is planned again once the sites have scored its weights
        start_dice = pretrained_dice(cfg, run.folder.read_run_info()) if run.done else -1.0
        dp_plans = dp_plan(cfg.site_round(spec, run.run_id, start_dice=start_dice, flip_axes=flips), fed,
                           announce=run.done > 0 or not cfg.pretrained_weights)
    if run.done:
        info = {**run.folder.read_run_info(), "config": cfg.to_dict(), "resumed": now(),
                "resumed_from_round": run.done}
    else:
        info = {"config": cfg.to_dict(), "run_id": run.run_id, "model": spec.to_dict(),
                "versions": versions(), "sites": {i["site"]: _public(i) for i in sites.values()},
                "flip_axes": list(flips),
                "training_sites": training, "heldout_sites": sorted(cfg.heldout_sites),
                "seed": cfg.seed, "started": now(), "ended": None,
                "pretrained": pretrained.to_dict() if pretrained else None, "dp_plan": dp_plans,
                "device": cfg.device}
    run.folder.write_run_info(info)
    return fed


def run_rounds(grid: Grid, run: OpenRun, fed: Federation) -> ArrayRecord:
    """The remaining rounds with Flower's strategy; every round ends in ``RoundLog``.

    Returns:
        The final global shared weights.
    """
    cfg = run.cfg
    initial = shared_record(fed.shared, fed.local)
    remaining = cfg.num_server_rounds - run.done
    recorder = RoundRecorder()
    round_log = RoundLog(run.folder, recorder, fed.checkpoint_meta(run), cfg.num_server_rounds,
                         checkpointed=run.done if run.pending_record else 0)
    if run.pending_record is not None:  # a crash cut the last round off from its scores
        recorder.restore(run.done, run.pending_record)
    if remaining <= 0:
        if run.pending_record is not None:
            log.warning("round %d has no validation scores: they would have come with round %d",
                        run.done, run.done + 1)
            round_log(run.done, initial, initial)
        return initial
    if cfg.pretrained_weights and not run.done:
        start_config = ConfigRecord(cfg.site_round(fed.spec, run.run_id, sim_state_root(run),
                                                   flip_axes=fed.flip_axes).to_record())
        record_start_scores(run, fed, score_start(grid, fed.site_of, initial, start_config, cfg))
    info = run.folder.read_run_info()
    cfg = without_failed_warm_start(cfg, fed.spec, info)
    start_dice = pretrained_dice(cfg, info)
    if cfg.dp == "sample" and (cfg is not run.cfg or (run.cfg.pretrained_weights and not run.done)):
        run.folder.write_run_info({**info, "dp_plan": dp_plan(
            cfg.site_round(fed.spec, run.run_id, start_dice=start_dice, flip_axes=fed.flip_axes), fed)})
    average = ModelAverage(ema_decay(cfg, start_dice), run.start_average)
    strategy = build_strategy(cfg, fed.site_of, fed.heldout_nodes, recorder, round_log,
                              round_offset=run.done, average=average, resume_state=run.server_state,
                              on_round_trained=round_log.trained)
    if run.pending_record is not None:  # the next round's training replies bring its scores
        strategy.pending = (run.done, initial, initial, run.server_state or {})
    round_config = cfg.site_round(fed.spec, run.run_id, sim_state_root(run), start_dice, fed.flip_axes)
    log.info("federated %s over %d site(s) (%s), %d round(s)%s", cfg.strategy,
             len(fed.training_sites), ", ".join(fed.training_sites), cfg.num_server_rounds,
             f", resuming after round {run.done}" if run.done else "")
    if average.decay:
        log.info("the server evaluates and saves a moving average of the global model (dp-ema %g)",
                 average.decay)
    wire = ConfigRecord(round_config.to_record())
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=remaining,
                            timeout=cfg.round_timeout, train_config=wire, evaluate_config=wire)
    return average.model(result.arrays if len(result.arrays) else initial)


def record_start_scores(run: OpenRun, fed: Federation, scores: dict[str, dict[str, float]]) -> None:
    """run.json's ``pretrained_alone``: what the pretrained weights score at each site before any
    training, beside which the run's own Dice shows what federated training added (or lost)."""
    entry: dict[str, Any] = {
        "sites": scores,
        "in_federation": site_spread({s: scores.get(s, {}).get("dice") for s in fed.training_sites})}
    if heldout := sorted(run.cfg.heldout_sites):
        entry["heldout_summary"] = site_spread({s: scores.get(s, {}).get("dice") for s in heldout})
    run.folder.write_run_info({**run.folder.read_run_info(), "pretrained_alone": entry})
    mean = entry["in_federation"]["mean"]
    log.info("the pretrained model alone (before round 1): mean Dice %s at the training sites (%s)",
             "n/a" if mean is None else f"{mean:.3f}",
             ", ".join(f"{s} {v['dice']:.3f}" for s, v in scores.items() if "dice" in v))


def pretrained_dice(cfg: RunConfig, info: dict[str, Any]) -> float:
    """What the run's pretrained weights scored at the training sites before round 1 (mean
    Dice; -1 for a run from scratch or one whose sites gave no Dice)."""
    mean = info.get("pretrained_alone", {}).get("in_federation", {}).get("mean")
    return float(mean) if cfg.pretrained_weights and mean is not None else -1.0


def without_failed_warm_start(cfg: RunConfig, spec: ModelSpec, info: dict[str, Any]) -> RunConfig:
    """The run's config for its rounds: as it is, unless its pretrained weights are a whole U-Net
    that scored below ``NO_WARM_START`` at the training sites before round 1 (a model of another
    distribution); then it trains from them as from scratch: the DP recipe's scratch learning
    rate, no server average (both tuned for a good start), and the sites' fresh local norms. A
    partial file (an encoder, a backbone) may score 0 and still help, so it is left alone."""
    mean = pretrained_dice(cfg, info)
    whole = (MODEL_KINDS[spec.model].dense and (info.get("pretrained") or {}).get("skipped") == 0
             and info["pretrained"]["loaded"] == len(build_model(spec).state_dict()))
    if not whole or mean < 0 or mean >= NO_WARM_START:
        return cfg
    log.warning("the pretrained model scores mean Dice %.3f at the training sites: it is no warm "
                "start for these sites, so the run trains from it as from scratch", mean)
    return cfg.replace(pretrained_weights="")


def dp_plan(round_config: SiteRoundConfig, fed: Federation, announce: bool = True) -> dict[str, Any]:
    """What each site will train with under dp=sample (the sites derive the same from the same
    config and their case counts): logged (``announce``), with a warning where the noise will
    swamp the signal, and returned for run.json."""
    plans = {}
    for info in fed.sites.values():
        site, cases = info["site"], info["num-train"]
        if site not in fed.training_sites or not cases:
            continue
        training = dp_training(round_config.dp, cases, round_config.batch_size, round_config.local_epochs)
        plan = plan_round(round_config.dp, cases, training)
        training = fit_to_noise(round_config.dp, training, plan)
        if announce:
            log.info("%s", describe(site, cases, training, plan, round_config.dp))
        if announce and (text := warning(site, cases, training, plan, round_config.dp.warm_start)):
            log.warning("%s", text)
        plans[site] = {**asdict(training), **asdict(plan), "noise_to_signal": noise_to_signal(plan, training)}
    return plans


def finalize(run: OpenRun, fed: Federation, final: ArrayRecord) -> Path:
    """Write model/global.pt, summary.json and report.html; returns the run folder."""
    cfg, folder = run.cfg, run.folder
    save_global_model(folder.dir, cfg.num_server_rounds, final, fed.checkpoint_meta(run))
    summary = summarize(folder.read_rounds(), fed.training_sites, sorted(cfg.heldout_sites))
    summary["strategy"], summary["local_layers"] = cfg.strategy, cfg.local_layers
    if start := folder.read_run_info().get("pretrained_alone"):
        summary["pretrained_alone"] = start
        if (text := below_pretrained(summary)) is not None:
            log.warning("%s", text)
    folder.write_summary(summary)
    folder.write_run_info({**folder.read_run_info(), "ended": now()})
    try:
        write_report(folder.dir)
    except Exception as err:  # noqa: BLE001 - a failed report must not fail a finished run
        log.warning("report.html not written: %s (run `fedseg report %s` to retry)", err, folder.dir)
    return folder.dir


def sim_state_root(run: OpenRun) -> str:
    """Simulation only: where each virtual site keeps its private state on this machine."""
    return str((run.folder.dir / "site-state").resolve()) if run.cfg.study_dir else ""


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("site", "problems")}
