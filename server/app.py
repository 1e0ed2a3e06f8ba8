"""fedseg ServerApp: the federation in named steps — open (or resume) the run, discover the
sites, build the initial model, run the rounds, finalize (global model, summary, report)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedseg.common.config import RunConfig
from fedseg.common.transforms import flip_axes
from fedseg.common.dp_recipe import ema_decay
from fedseg.common.logs import setup_logging
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.plan import FINGERPRINT
from fedseg.common.models import UNSEEN_PREFIX, build_model, local_keys, split_state, unseen_norm_set
from fedseg.common.records import received_state, shared_record
from fedseg.common.round_config import SiteData
from fedseg.common.weights import load_pretrained
from fedseg.server.checkpoints import save_global_model
from fedseg.server.discovery import LateSites, discover_sites, model_for_sites, site_names
from fedseg.server.federation_plan import read_plan, run_spacing, write_federation_plan
from fedseg.server.dp_plan import dp_plans
from fedseg.server.model_average import ModelAverage
from fedseg.server.reply_checks import DeclaredSite, ReplyChecks
from fedseg.server.report import write_report
from fedseg.server.run_folder import OpenRun, now, open_run, resume_config, resume_overrides, versions
from fedseg.server.site_strategy import SiteStrategy
from fedseg.server.step_timing import announce_expected_time
from fedseg.server.strategies import build_strategy
from fedseg.server.summary import below_pretrained, summarize
from fedseg.server.tracking import RoundTracking, check_trackers
from fedseg.server.warm_start import pretrained_dice, score_pretrained, without_failed_warm_start

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: the run config comes from pyproject + ``--run-config``;
    fedseg's round lines go to the ServerApp's output, which ``flwr run --stream`` shows."""
    setup_logging(quiet_flower=False)
    cfg = RunConfig.from_dict(dict(context.run_config))
    if cfg.resume and cfg.run_name:  # every key arrives, given or not: a default keeps the run's own value
        cfg = resume_config(Path(cfg.output_dir) / cfg.run_name, resume_overrides(cfg))
    run_federation(grid, cfg)


@dataclass
class Federation:
    """What the steps hand on: the sites, the model, and the initial shared weights."""

    sites: dict[int, dict[str, Any]]
    cohort: dict[str, dict[str, Any]]
    site_of: dict[int, str]
    heldout_nodes: set[int]
    training_sites: list[str]
    spec: ModelSpec
    patch: tuple[int, ...]
    local: set[str]
    shared: dict[str, torch.Tensor]
    flip_axes: tuple[int, ...]
    data: SiteData
    spacing: tuple[float, ...] = ()

    def checkpoint_meta(self, run: OpenRun) -> dict[str, Any]:
        """What every checkpoint carries beside the weights (see ``checkpoints.META_KEYS``)."""
        return {"model": self.spec.to_dict(), "local_layers": run.cfg.local_layers,
                "local_keys": sorted(self.local), "patch_size": list(self.patch),
                "flip_axes": list(self.flip_axes), "spacing": list(self.spacing), "run_name": run.cfg.run_name,
                "run_id": run.run_id}

    def train_cases(self) -> dict[str, int]:
        """Training site -> its training cases, as discovery reported them."""
        return {i["site"]: int(i["num-train"]) for i in self.sites.values() if i["site"] in self.training_sites}

    def declared(self) -> dict[str, DeclaredSite]:
        """Every site's training and validation cases, as discovery reported them."""
        return {i["site"]: DeclaredSite.from_discovery(i) for i in self.sites.values()}


def run_federation(grid: Grid, cfg: RunConfig, site_cache_mb: int = 0, split_site: int = 0,
                   sites_at_once: int = 0, on_final_model: Callable[[Path], None] | None = None) -> Path:
    """Run (or resume) a whole federated study over the sites connected to ``grid``.

    Args:
        site_cache_mb: simulation only: MiB of decoded training cases each virtual site keeps
            across rounds.
        split_site: simulation only: > 1 splits the study's one site into this many virtual
            sites (a resume keeps the run's own split, stored in run.json).
        sites_at_once: simulation only: training sites that share this machine's cores at a time
            (the expected round time counts them in turns); 0: each site computes on its own.
        on_final_model: called with ``model/global.pt`` as soon as the final model is saved,
            while the sites score it (the simulation's report gallery starts there).

    Returns:
        The run folder.
    """
    run = open_run(cfg)
    check_trackers(run.cfg)
    random.seed(run.cfg.seed)  # Flower samples nodes with `random`
    state_root = str((run.folder.dir / "site-state").resolve()) if run.cfg.study_dir else ""
    if run.cfg.resume:
        split_site = run.folder.split_site()
    data = run.cfg.site_data(state_root, site_cache_mb, split_site)
    cohort = run.folder.read_run_info()["sites"] if run.done else None  # a resume: the run's own sites
    sites = discover_sites(grid, run.cfg, data, cohort)
    fed = initial_model(run, sites, data, cohort)
    tracking = RoundTracking(run.cfg, run.folder.dir, run.run_id, set(run.cfg.heldout_sites), run.done)
    try:
        return finalize(run, fed, run_rounds(grid, run, fed, tracking, sites_at_once, on_final_model))
    except OSError as err:  # a full or read-only disk: every file is written atomically, so stop and say how
        log.error("the run folder cannot be written (%s); the run stops here. Once it can, resume it (resume=true, "
                  "or `fedseg simulate --resume-run %s`) from its last checkpoint", err, run.folder.dir)
        raise
    finally:
        tracking.close()


def initial_model(run: OpenRun, sites: dict[int, dict[str, Any]], data: SiteData,
                  cohort: dict[str, dict[str, Any]] | None = None) -> Federation:
    """Build the seeded initial model (or the checkpoint's, on resume), loading the server's own
    pretrained file into a new run; write run.json.

    Args:
        cohort: a resumed run's sites (run.json's ``sites``); None: a new run, whose sites are
            those that answered discovery.
    """
    cfg = run.cfg
    site_of, heldout, training = site_names(sites, cfg, None if cohort is None else sorted(cohort))
    plans = write_federation_plan(sites, training, run.folder.dir) if cohort is None else read_plan(run.folder.dir)
    cohort = cohort if cohort is not None else {i["site"]: _public(i) for i in sites.values()}
    spec, patch = model_for_sites(cfg, sites, plans)
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
    fed = Federation(sites, cohort, site_of, heldout, training, spec, patch, local, shared, flips, data,
                     run_spacing(cfg, spec, run.folder.dir))
    info: dict[str, Any] = {**run.folder.read_run_info(), "config": cfg.to_dict(), "resumed": now(),
                            "resumed_from_round": run.done} if run.done else {
        "config": cfg.to_dict(), "run_id": run.run_id, "model": spec.to_dict(), "patch_size": list(patch),
        "versions": versions(),
        "sites": cohort, "flip_axes": list(flips), "spacing": list(fed.spacing),
        "training_sites": training, "heldout_sites": sorted(cfg.heldout_sites), "seed": cfg.seed,
        "split_site": data.split_site,
        "started": now(), "ended": None, "pretrained": pretrained.to_dict() if pretrained else None,
        "dp_plan": None, "device": cfg.device}
    run.folder.write_run_info(info)
    return fed


def run_rounds(grid: Grid, run: OpenRun, fed: Federation, tracking: RoundTracking | None = None,
               sites_at_once: int = 0, on_final_model: Callable[[Path], None] | None = None) -> ArrayRecord:
    """Score pretrained weights at the sites (a fresh warm run), plan DP (or, without record-level
    DP, time the sites' steps for the expected time of a new run), then the remaining rounds in
    ``SiteStrategy`` (each round's line also goes to ``tracking``; ``sites_at_once`` and
    ``on_final_model``: see ``run_federation``).

    Returns:
        The final global shared weights.
    """
    initial = shared_record(fed.shared, fed.local)
    checks = ReplyChecks(received_state(initial), fed.declared())
    if run.cfg.pretrained_weights and not run.done:
        start_config = ConfigRecord(run.cfg.site_round(fed.spec, run.run_id, fed.data, flip_axes=fed.flip_axes,
                                                       patch=fed.patch, spacing=fed.spacing).to_record())
        score_pretrained(grid, run.folder, fed.site_of, fed.training_sites, sorted(run.cfg.heldout_sites),
                         initial, start_config, run.cfg, checks)
    info = run.folder.read_run_info()
    cfg = without_failed_warm_start(run.cfg, fed.spec, info)
    start_dice = pretrained_dice(cfg, info)
    round_config = cfg.site_round(fed.spec, run.run_id, fed.data, start_dice, fed.flip_axes, fed.patch, fed.spacing)
    if cfg.dp == "sample":  # planned once the sites have scored a warm run's weights
        run.folder.write_run_info({**info, "dp_plan": dp_plans(round_config, fed.train_cases())})
    elif not run.done:
        announce_expected_time(grid, run.folder, fed.site_of, fed.train_cases(), round_config,
                               cfg.num_server_rounds, cfg.round_timeout, sites_at_once)
    average = ModelAverage(ema_decay(cfg, start_dice), run.start_average)

    def final_model(arrays: ArrayRecord) -> None:  # finalize writes the same file again
        path = save_global_model(run.folder.dir, cfg.num_server_rounds, arrays, fed.checkpoint_meta(run))
        if on_final_model is not None:
            on_final_model(path)

    strategy = SiteStrategy(
        build_strategy(cfg, len(fed.training_sites)), fed.site_of, reply_checks=checks, folder=run.folder,
        checkpoint_meta=fed.checkpoint_meta(run), num_rounds=cfg.num_server_rounds,
        heldout_nodes=fed.heldout_nodes, min_sites=cfg.min_train_sites, round_timeout=cfg.round_timeout,
        average=average, ensemble_size=cfg.heldout_ensemble, transfer_dtype=cfg.transfer_dtype,
        pretrained_start=bool(cfg.pretrained_weights), done=run.done, server_state=run.server_state,
        pending_record=run.pending_record,
        late_sites=LateSites(fed.data, fed.cohort, set(cfg.heldout_sites), cfg.round_timeout), tracking=tracking,
        evaluate_every=cfg.evaluate_every, adapt_every_round=cfg.heldout_adapt == "every",
        on_final_model=final_model)
    log.info("federated %s over %d site(s) (%s), %d round(s)%s", cfg.strategy,
             len(fed.training_sites), ", ".join(fed.training_sites), cfg.num_server_rounds,
             f", resuming after round {run.done}" if run.done else "")
    if average.decay:
        log.info("the server evaluates and saves a moving average of the global model (dp-ema %g)",
                 average.decay)
    return strategy.run(grid, initial, ConfigRecord(round_config.to_record()))


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


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in ("site", "problems", FINGERPRINT, "no-fingerprint")}
