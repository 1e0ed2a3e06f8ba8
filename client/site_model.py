"""The model a site uses: the global shared weights plus its own local layers for the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fedseg.client.site import SiteLocation
from fedseg.client.state import RunState, SiteState
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.round_config import SiteRoundConfig
from fedseg.common.data import DataError
from fedseg.common.models import UNSEEN_PREFIX, build_model, local_keys, model_signature, unseen_norms
from fedseg.common.records import weights_problem
from fedseg.common.transforms import roi_size
from fedseg.common.weights import load_pretrained

log = logging.getLogger(__name__)


@dataclass
class SiteModel:
    """A site's model for a round.

    Args:
        model: global shared weights + the site's local layers.
        local: state-dict keys that never leave the site.
        shared: the global shared weights the round started from (FedProx's anchor).
        run: the run's folder in the site's state dir.
        signature: the architecture the local layers belong to.
    """

    model: nn.Module
    local: set[str]
    shared: dict[str, torch.Tensor]
    run: RunState
    signature: str

    def save_local_layers(self, server_round: int) -> None:
        """Keep the trained site-local tensors for the next round (atomically)."""
        state = self.model.state_dict()
        self.run.save_local_layers({k: state[k] for k in self.local}, server_round, self.signature)


def round_model(cfg: SiteRoundConfig, site: SiteLocation, received: dict[str, torch.Tensor],
                local_round: int) -> SiteModel:
    """Build the run's model: the site's local layers of this run as they were after round
    ``local_round`` (before its first round: the site's own pretrained file, else the unseen-site
    norm set if the message carries one, as it does for sites that never train), then the global
    shared weights ``received`` (anything sent for a site-local key is ignored).

    Raises:
        MessageRefused: ``received`` is not the model the round config describes.
    """
    model = build_model(cfg.model)
    local = local_keys(model, cfg.model, cfg.local_layers)
    check_received(received, model.state_dict(), local)
    signature = _signature(model, cfg.model, cfg.local_layers, local)
    run = SiteState(site.state_dir).run(cfg.run_name, cfg.run_id)
    saved = run.load_local_layers(signature, up_to_round=local_round)
    if saved:
        model.load_state_dict(saved, strict=False)
    elif site.pretrained:  # until the site has its own local layers, its file fills them
        load_pretrained(model, site.pretrained)
    else:
        model.load_state_dict({k: v for k, v in unseen_norms(received).items() if k in local}, strict=False)
    shared = {k: v for k, v in received.items() if k in model.state_dict() and k not in local}
    model.load_state_dict(shared, strict=False)
    return SiteModel(model, local, shared, run, signature)


class MessageRefused(ValueError):
    """A message's weights are not the model its round config describes; nothing is trained."""


def check_received(received: dict[str, torch.Tensor], model: dict[str, torch.Tensor], local: set[str]) -> None:
    """The weights a message brought are the model's shared tensors (and at most its unseen-site
    norm set; tensors sent for site-local names are ignored): every shared name present, nothing
    else, the model's shapes, finite. A broken or hostile coordinator's NaN would otherwise
    surface as a training loss that "became nan", and a missing tensor would silently train from
    initial values.

    Raises:
        MessageRefused: naming the first problem found.
    """
    unseen = {UNSEEN_PREFIX + k: v for k, v in model.items() if k in local}
    shared = {k: v for k, v in model.items() if k not in local} | unseen
    if (problem := weights_problem(received, shared, optional=unseen, ignored=local)) is not None:
        raise MessageRefused(f"the message's weights are not the model its round config describes: {problem}; "
                             "nothing was trained")


def round_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's ``checkpoints/round-N.pt`` files, oldest round first (ensemble members)."""
    return sorted(Path(run_dir, "checkpoints").glob("round-*.pt"), key=lambda p: int(p.stem.split("-")[1]))


class SavedModel(NamedTuple):
    """A loaded model (eval mode), its spec, the run's patch size (sliding-window ROI / tile), the
    axes its training mirrored patches along (``fedseg predict``'s test-time flips), which
    site-local layers it holds: ``site`` (this site's own), ``unseen-site`` (the federation's
    unseen-site norm set), ``initial`` (none found: initial values) or ``""`` (it has none), and
    the voxel spacing its images were resampled to (empty: their own grid)."""

    model: nn.Module
    spec: ModelSpec
    patch_size: tuple[int, ...]
    flip_axes: tuple[int, ...]
    local_source: str = ""
    spacing: tuple[float, ...] = ()


def recorded_patch(meta: dict[str, Any], spec: ModelSpec) -> tuple[int, ...]:
    """The patch a saved model's description records, one size per axis (an edge in files saved
    before plans gave one per axis)."""
    raw = meta["patch_size"]
    return roi_size(int(raw) if isinstance(raw, (int, float)) else tuple(raw), spec.spatial_dims)


def recorded_flip_axes(meta: dict[str, Any], spec: ModelSpec) -> tuple[int, ...]:
    """The flip axes a saved model's description records; every axis for one saved before runs
    recorded them (they were all mirrored then)."""
    return tuple(meta.get("flip_axes", range(spec.spatial_dims)))


def recorded_spacing(meta: dict[str, Any]) -> tuple[float, ...]:
    """The grid a saved model's run resampled images to (none in files saved before runs did)."""
    return tuple(float(s) for s in meta.get("spacing", ()))


def saved_model(model_path: str | Path, state_dir: str | Path | None) -> SavedModel:
    """A run's ``model/global.pt`` (or checkpoint) plus this site's local layers of that run.

    Raises:
        DataError: unreadable model file.
        RuntimeError: the site's local layers of that run are damaged or of another model.
    """
    try:
        saved = torch.load(model_path, map_location="cpu", weights_only=True)
        spec = ModelSpec.from_dict(saved["model"])
        local_layers, run_name, run_id = saved["local_layers"], saved["run_name"], saved["run_id"]
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a fedseg model
        raise DataError(f"{model_path}: not a fedseg global model ({err})") from None
    model = build_model(spec)
    model.load_state_dict(saved["state_dict"], strict=False)
    local = local_keys(model, spec, local_layers)
    mine = None
    if state_dir:
        run = SiteState(state_dir).run(run_name, run_id)
        mine = run.load_local_layers(_signature(model, spec, local_layers, local))
    unseen = {k: v for k, v in unseen_norms(saved["state_dict"]).items() if k in local}
    has_local = any(torch.is_floating_point(v) for k, v in model.state_dict().items() if k in local)
    source = "site" if mine else "unseen-site" if unseen else "initial" if has_local else ""
    if mine:
        model.load_state_dict(mine, strict=False)
    elif unseen:
        model.load_state_dict(unseen, strict=False)
        log.info("no local layers of run %s %s: using the federation's unseen-site norm set",
                 run_name, f"in {state_dir}" if state_dir else "(no site state dir given)")
    elif has_local:
        log.warning("no local layers of run %s %s: site-local layers keep their initial values",
                    run_name, f"in {state_dir}" if state_dir else "(no site state dir given)")
    return SavedModel(model.eval(), spec, recorded_patch(saved, spec), recorded_flip_axes(saved, spec), source,
                      recorded_spacing(saved))


def _signature(model: nn.Module, spec: ModelSpec, local_layers: str, local: set[str]) -> str:
    state = model.state_dict()
    return model_signature(spec, local_layers, {k: state[k] for k in local})
