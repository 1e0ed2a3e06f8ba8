"""Run fedseg's ServerApp and ClientApp in Flower's simulation engine over a study folder."""

from __future__ import annotations

import logging
import math
import os
import resource
import sys
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedseg.client.app import app as client_app
from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.round_config import SITE_CACHE_MB
from fedseg.common.devices import resolve_device
from fedseg.common.data import DataError, check_site, study_sites
from fedseg.server.app import run_federation
from fedseg.server.report import write_report
from fedseg.server.run_folder import RunFolder, resumable, resume_config
from fedseg.server.tracking import check_trackers
from fedseg.simulations.engine import prompt_engine
from fedseg.simulations.gallery import BackgroundGallery, write_gallery

log = logging.getLogger(__name__)


def site_cpus(cores: int, training_sites: int, at_once: int = 0) -> float:
    """Ray CPUs per virtual site (Ray gives a site's process that many PyTorch threads, at least
    one), so that a round's training sites keep every core busy. ``at_once`` > 0: that many sites
    side by side on cores / at_once each (1: one site at a time on every core, one site process's
    memory). 0: ``cores // sites`` with fewer sites than cores; with up to twice as many, all side
    by side on a share of a core each (three sites on two cores in turns would leave a core idle
    for the last one); beyond that, one core each, in turns."""
    if at_once > 0:
        at_once = min(at_once, max(1, training_sites))
        return float(cores // at_once) if at_once <= cores else math.floor(cores / at_once * 1000) / 1000
    sites = max(1, training_sites)
    if sites <= cores:
        return float(cores // sites)
    if sites <= 2 * cores and sites % cores:
        return math.floor(cores / sites * 1000) / 1000  # Flower runs int(cores / share) = sites at once
    return 1.0


def simulate(cfg: RunConfig, num_cpus: int | None = None, ray_address: str = "",
             gpus_per_site: float | None = None, site_cache_mb: int = SITE_CACHE_MB,
             split_site: int = 0, sites_at_once: int = 0) -> Path:
    """Validate every site, then run the study with one virtual Flower node per site.

    Args:
        cfg: run config; ``study_dir`` must name the study folder (``resume``: the run folder
            ``output_dir/run_name`` is continued with its stored config).
        num_cpus: CPUs Ray may use (default: all), shared out as ``site_cpus`` says.
        ray_address: attach to this running Ray cluster (``ray start --head`` on one machine,
            ``ray start --address ...`` on the others) instead of starting one here; every node
            needs fedseg installed and the study folder at the same path.
        gpus_per_site: GPU share of each virtual site (0.25 runs four sites on one GPU at once);
            None: 1.0 where the run computes on a GPU, else 0.
        site_cache_mb: MiB of decoded training cases each virtual site keeps across rounds (0:
            read from disk every round), >= 0.
        split_site: > 1 splits a study of one site into this many virtual sites (disjoint,
            seeded), >= 0; a resume keeps the run's own split.
        sites_at_once: training sites that compute side by side, each a process of its own
            (``site_cpus``); 0: as many as keep the cores busy. Fewer hold less memory.

    Returns:
        The run folder.

    Raises:
        DataError: a site fails the data check (every problem listed, nothing trained).
    """
    if cfg.resume:
        run_dir = Path(cfg.output_dir) / cfg.run_name
        cfg = resume_config(run_dir, resumable(cfg))
        stored_split = RunFolder(run_dir).split_site()
        if split_site not in (0, stored_split):
            raise ConfigError(f"--split-site {split_site}: {run_dir} was split into {stored_split} "
                              "virtual site(s); a resume keeps its split")
        split_site = stored_split
    if not cfg.study_dir:
        raise DataError("simulation needs a study folder (run-config 'study-dir')")
    check_trackers(cfg)
    cfg = cfg.replace(study_dir=str(Path(cfg.study_dir).resolve()),
                      output_dir=str(Path(cfg.output_dir).resolve()))
    try:  # every virtual site computes on this machine: a missing GPU stops the run before round 1
        device = resolve_device(cfg.device, "run-config 'device'")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if gpus_per_site is not None and gpus_per_site < 0:
        raise ConfigError(f"--gpus-per-site {gpus_per_site:g}: must be >= 0")
    if split_site < 0:
        raise ConfigError(f"--split-site {split_site}: must be >= 0 (0: one site per folder)")
    if site_cache_mb < 0:
        raise ConfigError(f"--site-cache-mb {site_cache_mb}: must be >= 0 (0: no cache)")
    if sites_at_once < 0:
        raise ConfigError(f"--sites-at-once {sites_at_once}: must be >= 0 (0: as many as keep the cores busy)")
    gpus = gpus_per_site if gpus_per_site is not None else float(device.startswith("cuda"))
    sites = study_sites(cfg.study_dir, split_site)
    problems = [p for folder in sorted({s.site_dir for s in sites}) for p in check_site(folder)]
    if problems:
        raise DataError(f"{len(problems)} data problem(s) in {cfg.study_dir}:\n  " + "\n  ".join(problems))
    log.info("simulating %d site(s) from %s", len(sites), cfg.study_dir)

    result: dict[str, Path] = {}
    server_app = ServerApp()
    at_once = 0  # a Ray cluster's nodes: each site computes on its own
    gallery = BackgroundGallery()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        result["run_dir"] = run_federation(grid, cfg, site_cache_mb, split_site, at_once, gallery.start)

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # sites' lines look alike; Ray would fold them
    ray_args: dict[str, object] = {"logging_level": "ERROR", "log_to_driver": True}  # sites' own lines
    if ray_address:  # a cluster's size is its own: Ray refuses num_cpus when attaching
        ray_args["address"] = ray_address
        log.info("attaching Flower's simulation engine to the Ray cluster at %s (one CPU per site%s)...",
                 ray_address, f", {gpus:g} GPU per site" if gpus else "")
        share = 1.0
    else:  # a Ray instance of its own, even where `ray start` left a cluster running on this machine
        cores = num_cpus or os.cpu_count() or 1
        ray_args |= {"address": "local", "num_cpus": cores}
        share = site_cpus(cores, sum(s.name not in cfg.heldout_sites for s in sites), sites_at_once)
        at_once = int(cores / share)
        if gpus:  # Ray also holds a site back until its GPU share is free
            at_once = max(1, min(at_once, int(torch.cuda.device_count() / gpus)))
        log.info("starting Flower's simulation engine (Ray, %d CPU(s): %d site(s) at a time, %d thread(s) "
                 "each%s)...", cores, at_once, max(1, int(share)),
                 f", {gpus:g} GPU per site on {device}" if gpus else "")
        log.info("memory: each site process holds the libraries (%.1f GiB, as this process does now), the "
                 "round's decoded cases%s and its training step (forward passes keep at most %d MiB of "
                 "activations, run-config step-memory-mb, or one patch's where that is more, and the "
                 "backward pass about as much again); "
                 "--sites-at-once 1 holds one such process", _resident_gib(),
                 f" (and up to {site_cache_mb} MiB of earlier rounds', --site-cache-mb)" if site_cache_mb else "",
                 cfg.step_memory_mb)
    with prompt_engine():  # Flower's own scans every inbox and waits 0.1 s per poll
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=len(sites),
            # Ray gives each site's process as many PyTorch threads as CPUs it assigns
            backend_config={"client_resources": {"num_cpus": share, "num_gpus": gpus}, "init_args": ray_args},
        )
    if "run_dir" not in result:
        raise RuntimeError("the simulation ended without finishing the run; see the log above")
    write_gallery(result["run_dir"], gallery.items(result["run_dir"]))
    write_report(result["run_dir"])
    return result["run_dir"]


def _resident_gib() -> float:
    """This process's resident memory in GiB (its peak where there is no /proc)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
        return peak / (2**30 if sys.platform == "darwin" else 2**20)
