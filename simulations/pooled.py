"""One model trained in one process on the training splits of several sites, without federation
or DP: the study's pooled and local-only baselines, and pretraining on public data."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fedseg.client.tasks import Task, task_for
from fedseg.client.trainer import train_local
from fedseg.common.atomic import atomic_torch_save
from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.lr_schedule import round_lr
from fedseg.common.data import SiteRef, SiteSpec, case_seed, read_site, split_training, study_sites
from fedseg.common.transforms import flip_axes, image_channels
from fedseg.common.devices import resolve_device
from fedseg.common.model_kinds import AUTO_MODEL
from fedseg.common.models import ModelSpec, build_model
from fedseg.common.plan import plan_federation, resampling_grid, site_fingerprint
from fedseg.common.precision import site_precision
from fedseg.common.weights import load_pretrained

log = logging.getLogger(__name__)


class Pooled(NamedTuple):
    """A model trained in one process, its task and its patch (one size per axis)."""

    model: torch.nn.Module
    task: Task
    patch: tuple[int, ...]


class PooledNetwork(NamedTuple):
    """The model, its patch (one size per axis) and the grid its images are resampled to
    (empty: their own)."""

    spec: ModelSpec
    patch: tuple[int, ...]
    spacing: tuple[float, ...] = ()


def pooled_network(cfg: RunConfig, sites: list[SiteSpec]) -> PooledNetwork:
    """The run's model, patch and grid for ``sites``' data, as a federation of them would plan
    them from their fingerprints: the network with ``model=auto``, the grid with ``spacing=auto``
    (``federation_plan.run_spacing``)."""
    first = sites[0]
    plans, merged = {}, None
    if cfg.model == AUTO_MODEL or cfg.spacing == "auto":
        try:
            planned, merged, _ = plan_federation({s.name: site_fingerprint(s) for s in sites if s.training})
            plans = {name: plan.to_json() for name, plan in planned.items()}
        except ValueError as err:  # no plan (model=auto then says so)
            log.warning("no plan for these sites: %s", err)
    spec, patch = cfg.network(first.spatial_dims, image_channels(first), first.num_classes,
                              plans if cfg.model == AUTO_MODEL else None)
    auto = cfg.spacing == "auto" and spec.kind.dense and merged is not None
    return PooledNetwork(spec, patch, resampling_grid(plans.get(f"{spec.spatial_dims}d"), merged) if auto else ())


def train_pooled(cfg: RunConfig, sites: list[SiteSpec], seed_site: str,
                 network: PooledNetwork | None = None) -> Pooled:
    """A model trained on the pooled training splits of ``sites`` with the step budget a
    federated run gives a site (rounds x local epochs passes), from ``cfg``'s pretrained
    weights when it names a file; ``network``: the model, patch and grid (default:
    ``pooled_network`` of ``sites``; a study gives every baseline the federation's)."""
    spec, patch, spacing = network or pooled_network(cfg, sites)
    sites = on_grid(sites, spacing)
    cases = [c for s in sites for c in split_training(s, cfg.val_fraction, cfg.seed)[0]]
    first = sites[0]
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if cfg.pretrained_weights:
        log.info("%s", load_pretrained(model, cfg.pretrained_weights).summary())
    task = task_for(spec)
    device = run_device(cfg)
    options = dict(batch_size=cfg.batch_size, patch_size=patch, device=device, augment=cfg.augment,
                   flips=flip_axes(cfg.flips, first.spatial_dims, [s.modality for s in sites]),
                   precision=site_precision(cfg.amp, device, deterministic=cfg.deterministic),
                   compile_step=cfg.compile, step_memory_mb=cfg.step_memory_mb)
    if cfg.lr_schedule == "constant":
        train_local(model, task, first, cases, epochs=cfg.num_server_rounds * cfg.local_epochs, lr=cfg.lr,
                    seed=case_seed(cfg.seed, seed_site, 0), **options)
    else:  # the federated schedule, round by round
        for rnd in range(1, cfg.num_server_rounds + 1):
            train_local(model, task, first, cases, epochs=cfg.local_epochs,
                        lr=round_lr(cfg.lr, cfg.lr_schedule, rnd, cfg.num_server_rounds),
                        seed=case_seed(cfg.seed, seed_site, rnd), **options)
    return Pooled(model, task, patch)


def on_grid(sites: list[SiteSpec], spacing: tuple[float, ...]) -> list[SiteSpec]:
    """``sites`` as a run resampling their images to ``spacing`` reads them."""
    return [dataclasses.replace(s, target_spacing=spacing) for s in sites]


def run_device(cfg: RunConfig) -> str:
    """The run's device on this machine (``auto``: CUDA where present).

    Raises:
        ConfigError: CUDA asked for on a machine without it.
    """
    try:
        return resolve_device(cfg.device, "run-config 'device'")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def pretrain(public_dir: str | Path, output: str | Path, cfg: RunConfig) -> dict[str, Any]:
    """Train on public data (a site folder or a study folder) and write the model's state dict
    to ``output``, for ``pretrained-weights``. Public data never touches a site's privacy budget.

    Returns:
        cases trained on and the Dice on each public site's validation split.
    """
    public = Path(public_dir)
    refs = ([SiteRef(public.name, public)] if (public / "dataset.json").is_file()
            else study_sites(public))
    sites = [read_site(ref, seed=cfg.seed) for ref in refs]
    log.info("pretraining on %d public site(s): %s", len(sites), ", ".join(s.name for s in sites))
    network = pooled_network(cfg, sites)
    sites = on_grid(sites, network.spacing)
    model, task, patch = train_pooled(cfg, sites, seed_site="public", network=network)
    atomic_torch_save(output, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    val = {s.name: task.evaluate(model, s, split_training(s, cfg.val_fraction, cfg.seed)[1],
                                 patch_size=patch, device=run_device(cfg))["dice"] for s in sites}
    return {"cases": sum(len(split_training(s, cfg.val_fraction, cfg.seed)[0]) for s in sites),
            "validation_dice": val}
