"""Simulation only: best/worst validation cases per site as overlays with explanation maps.

In a real federation images never leave a site, so the report has no gallery; in a simulation
the researcher holds every site's data, and seeing where the model fails is the point.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from monai.transforms import Compose
from monai.visualize import OcclusionSensitivity, SmoothGrad

from fedseg.client.predict import PALETTE, overlay_image
from fedseg.client.site import sim_state_dir
from fedseg.client.site_model import saved_model
from fedseg.client.tasks import task_for
from fedseg.common.data import read_site, split_training, study_sites
from fedseg.common.transforms import PatchSize, base_transforms, roi_size, to_dicts
from fedseg.common.atomic import atomic_write_bytes
from fedseg.common.models import ModelSpec
from fedseg.server.report import GALLERY
from fedseg.server.run_folder import RunFolder

log = logging.getLogger(__name__)


class _ForegroundScore(torch.nn.Module):
    """Segmentation net -> mean foreground probability per class, so that MONAI's occlusion
    sensitivity (made for classifiers) shows which regions drive the predicted foreground."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.net(x).softmax(1)[:, 1:]
        return probs.flatten(2).mean(-1)


@torch.no_grad()
def make_gallery(run_dir: str | Path, max_sites: int = 4) -> list[dict[str, Any]]:
    """Best and worst validation case of up to ``max_sites`` sites (empty outside simulation):
    ground truth and prediction over the image (every instance in its own colour for Mask
    R-CNN), and, for per-pixel models, an occlusion map (2D) and a gradient saliency map."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    cfg = info["config"]
    task = task_for(ModelSpec.from_dict(info["model"]))
    if not cfg.get("study-dir") or not Path(cfg["study-dir"]).is_dir():
        return []
    items = []
    refs = {r.name: r for r in study_sites(cfg["study-dir"], RunFolder(run_dir).split_site())}
    for site in (info["training_sites"] + info["heldout_sites"])[:max_sites]:
        log.info("report gallery: %s", site)
        state = sim_state_dir(run_dir / "site-state", site)
        model, _, patch, *_, spacing = saved_model(run_dir / "model" / "global.pt", state if state.is_dir() else None)
        spec = read_site(refs[site], seed=cfg["seed"], target_spacing=spacing)
        _, val = split_training(spec, cfg["val-fraction"], cfg["seed"])
        # image, label and prediction on the grid the network sees (the run's spacing, if any)
        transform = Compose(base_transforms(spec, task.keep_instances))
        scored = []
        for item in to_dicts(val):
            data = transform(item)
            pred = task.infer(model, data["image"], patch, "cpu")
            scores = task.new_scores(spec, 1)
            task.add_case(scores, pred, data, "")
            scored.append((scores.result().get("dice", float("nan")), data["image"][None],
                           data["label"][None], pred.labels[None, None]))
        scored = [s for s in scored if np.isfinite(s[0])]
        if not scored:
            continue
        scored.sort(key=lambda s: s[0])
        names = {i: spec.labels.get(i, str(i)) for i in range(1, spec.num_classes)}
        for tag, (dice, image, label, pred) in (("worst", scored[0]), ("best", scored[-1])):
            view = case_view(image, label, pred, patch, spec.spatial_dims)
            maps = explanation_maps(model, view, patch) if task.dense_logits else {}
            items.append({"title": f"{site}: {tag} validation case (Dice {dice:.3f})",
                          "caption": _caption(view, maps, instances=not task.dense_logits),
                          "png": _figure(view, maps, names, instances=not task.dense_logits)})
            if len(scored) == 1:
                break
    return items


def case_view(image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor, patch: PatchSize,
              dims: int) -> dict[str, Any]:
    """One patch-sized crop of a case (batch-first tensors) around its centre and, for a volume,
    the slice along the last axis with the most ground-truth foreground: what the figure shows
    and the maps explain (~120 patch-sized passes for occlusion, a small share of a run)."""
    spatial = image.shape[2:]
    focus = [s // 2 for s in spatial]
    if dims == 3:
        area = (label[0, 0] > 0).flatten(0, 1).sum(0)
        if area.max() > 0:
            focus[-1] = int(area.argmax())
    roi = roi_size(patch, dims)
    start = [min(max(0, f - p // 2), max(0, s - p)) for f, s, p in zip(focus, spatial, roi)]
    crop = (slice(None), slice(None), *(slice(b, b + min(s, p)) for b, s, p in zip(start, spatial, roi)))
    image, label, pred = (t[crop] for t in (image, label, pred))
    return {"image": image.float(), "label": label, "pred": pred, "dims": dims,
            "slice": focus[-1] - start[-1] if dims == 3 else None,
            "fits": all(s >= p for s, p in zip(image.shape[2:], roi))}


def explanation_maps(model: torch.nn.Module, view: dict[str, Any], patch: PatchSize) -> dict[str, np.ndarray]:
    """What drives the predicted foreground in the crop, each map 2D (a volume's shown slice):
    ``occlusion`` (2D only: how much hiding each region lowers the foreground score) and
    ``gradient`` (MONAI's SmoothGrad: the squared gradient of the foreground score per pixel,
    averaged over 16 noisy copies of the crop, max over channels). Empty when the crop is
    smaller than the model's patch."""
    if not view["fits"]:
        return {}
    score, image, maps = _ForegroundScore(model).eval(), view["image"], {}
    if view["dims"] == 2:
        # activate=False: MONAI's default softmax over a single score would make every map 1.0; 4 occluded
        # copies per pass are as fast on a CPU as 16 and hold a quarter of the activations beside the sites
        sens = OcclusionSensitivity(score, mask_size=max(4, min(roi_size(patch, 2)) // 8), n_batch=4, verbose=False,
                                    overlap=0.25, activate=False)
        with warnings.catch_warnings():  # MONAI's own indexing deprecation notices
            warnings.simplefilter("ignore", UserWarning)
            maps["occlusion"] = (score(image)[0, 0] - sens(image)[0][0, 0]).detach().numpy()
    with torch.enable_grad():
        grad = SmoothGrad(score, n_samples=16, verbose=False)(image.clone(), index=0).amax(1)[0]
    maps["gradient"] = _shown(grad.numpy(), view)
    return maps


def _shown(array: np.ndarray, view: dict[str, Any]) -> np.ndarray:
    """The slice of a (spatial) array that the figure shows."""
    return array[..., view["slice"]] if view["dims"] == 3 else array


def _caption(view: dict[str, Any], maps: dict[str, np.ndarray], instances: bool) -> str:
    where = (f"slice {view['slice']} of the crop along the last axis (the one with the most ground "
             f"truth)" if view["dims"] == 3 else "a patch-sized crop around the centre")
    parts = ["image", "ground truth", "prediction"] + [
        {"occlusion": "occlusion (red: hiding the region lowers the predicted foreground; blue: raises it)",
         "gradient": "gradient saliency (bright: pixels the foreground score is most sensitive to)"}[k]
        for k in maps]
    return " | ".join(parts) + f"; {where}" + ("; each instance in its own colour" if instances else "")


def _figure(view: dict[str, Any], maps: dict[str, np.ndarray], names: dict[int, str], instances: bool) -> bytes:
    """Image, ground truth and prediction over it, and the explanation maps with colour bars."""
    pixels = _shown(view["image"][0].numpy(), view)
    label, pred = (_shown(view[k][0, 0].numpy(), view) for k in ("label", "pred"))
    panels = [("image", overlay_image(pixels, np.zeros(pixels.shape[1:], np.int64)), None),
              ("ground truth", overlay_image(pixels, label), None),
              ("prediction", overlay_image(pixels, pred), None)]
    if "occlusion" in maps:
        bound = float(np.abs(maps["occlusion"]).max()) or 1.0
        panels.append(("occlusion: drop in\nforeground score", maps["occlusion"],
                       dict(cmap="coolwarm", vmin=-bound, vmax=bound)))
    if "gradient" in maps:
        peak = float(maps["gradient"].max()) or 1.0
        panels.append(("gradient saliency (SmoothGrad),\nrelative to its peak", maps["gradient"] / peak,
                       dict(cmap="magma", vmin=0, vmax=1)))
    # a Figure of its own, not pyplot's shared state: the gallery may be drawn beside the report's plots
    fig = Figure(figsize=(2.8 * len(panels), 3.3), dpi=90)
    axes = fig.subplots(1, len(panels))
    for ax, (title, data, style) in zip(axes, panels):
        shown = ax.imshow(data, **(style or {}))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
        if style:
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    if not instances:
        handles = [Patch(color=PALETTE[(i - 1) % len(PALETTE)], label=name) for i, name in names.items()]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    buffer = io.BytesIO()
    fig.tight_layout(rect=(0, 0.07 if not instances else 0, 1, 1))
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_gallery(run_dir: str | Path, items: list[dict[str, Any]]) -> None:
    """Keep the gallery in the run folder, so that
    every later ``write_report`` shows it: ``plots/gallery/NN.png`` plus ``gallery.json``.

    Args:
        run_dir: the run folder.
        items: dicts with ``title``, ``caption`` and ``png`` bytes.
    """
    folder = Path(run_dir) / GALLERY
    index = []
    for i, item in enumerate(items):
        name = f"{i:02d}.png"
        atomic_write_bytes(folder / name, item["png"])
        index.append({"title": item["title"], "caption": item["caption"], "file": name})
    atomic_write_bytes(folder / "gallery.json", json.dumps(index, indent=1).encode())


class BackgroundGallery:
    """Builds the gallery in a thread from the moment the final model is saved, so that it draws
    while the sites score that model (a held-out site's adaptation leaves cores idle there).

    ``start`` is ``run_federation``'s ``on_final_model``; ``items`` waits for the thread (or, where
    the run never reached its final model in this process, builds the gallery then)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._items: list[dict[str, Any]] = []
        self._error: BaseException | None = None

    def start(self, model_path: Path) -> None:
        """Begin building the gallery of the run whose ``model/global.pt`` is ``model_path``."""
        def build() -> None:
            try:
                self._items = _timed_gallery(model_path.parents[1], " while the sites score the final model")
            except BaseException as err:  # noqa: BLE001 - handed to the thread that asks for the items
                self._error = err

        self._thread = threading.Thread(target=build, name="report-gallery", daemon=True)
        self._thread.start()

    def items(self, run_dir: str | Path) -> list[dict[str, Any]]:
        """The gallery of ``run_dir``: the thread's, once it ends, else built now.

        Raises:
            whatever building the gallery raised.
        """
        if self._thread is None:
            return _timed_gallery(run_dir)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._items


def _timed_gallery(run_dir: str | Path, when: str = "") -> list[dict[str, Any]]:
    """``make_gallery`` with a line before and after it in the run's log."""
    started = time.monotonic()
    log.info("building the report gallery (best/worst validation cases, explanation maps)%s...", when)
    items = make_gallery(run_dir)
    log.info("report gallery built in %.0fs", time.monotonic() - started)
    return items
