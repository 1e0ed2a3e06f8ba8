"""Simulation only: best/worst validation cases per site as overlays with explanation maps.

In a real federation images never leave a site, so the report has no gallery; in a simulation
the researcher holds every site's data, and seeing where the model fails is the point.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.visualize import OcclusionSensitivity  # noqa: E402

from fedseg.client.predict import overlay_image  # noqa: E402
from fedseg.client.site import sim_state_dir  # noqa: E402
from fedseg.client.site_model import saved_model  # noqa: E402
from fedseg.client.tasks import task_for  # noqa: E402
from fedseg.common.data import read_site, split_training, study_sites, to_dicts  # noqa: E402
from fedseg.common.models import ModelSpec  # noqa: E402

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
    R-CNN), and, for per-pixel models, an occlusion-sensitivity map."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    cfg = info["config"]
    task = task_for(ModelSpec.from_dict(info["model"]))
    if not cfg.get("study-dir") or not Path(cfg["study-dir"]).is_dir():
        return []
    items = []
    refs = {r.name: r for r in study_sites(cfg["study-dir"], cfg.get("split-site", 0))}
    for site in (info["training_sites"] + info["heldout_sites"])[:max_sites]:
        log.info("report gallery: %s", site)
        state = sim_state_dir(run_dir / "site-state", site)
        model, _, patch = saved_model(run_dir / "model" / "global.pt", state if state.is_dir() else None)
        spec = read_site(refs[site], seed=cfg["seed"])
        _, val = split_training(spec, cfg["val-fraction"], cfg["seed"])
        transform = task.eval_data(spec)
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
        for tag, (dice, image, label, pred) in (("worst", scored[0]), ("best", scored[-1])):
            explain = task.dense_logits  # occlusion maps explain per-pixel logits; a detector has none
            items.append({"title": f"{site}: {tag} validation case (Dice {dice:.3f})",
                          "caption": "image | ground truth | prediction" + (
                              " | occlusion sensitivity (red: hiding the region lowers the predicted "
                              "foreground)" if explain else " (each instance in its own colour)"),
                          "png": _figure(model if explain else None, image, label, pred, patch,
                                         spec.spatial_dims)})
            if len(scored) == 1:
                break
    return items


def _figure(model: torch.nn.Module | None, image: torch.Tensor, label: torch.Tensor, pred: torch.Tensor,
            patch: int, dims: int) -> bytes:
    """Image, ground truth and prediction over it, and (``model`` given, 2D) occlusion sensitivity."""
    occlusion = None
    if dims == 3:  # show the middle slice along the last axis
        mid = image.shape[-1] // 2
        image, label, pred = image[..., mid], label[..., mid], pred[..., mid]
    else:
        # one patch around the centre of the case: the occlusion map costs ~200 patch-sized
        # forward passes (a 1/8-patch mask at 50% overlap), a small share of a run's training
        centre = [max(0, (s - patch) // 2) for s in image.shape[2:]]
        crop = tuple(slice(c, c + min(s, patch)) for c, s in zip(centre, image.shape[2:]))
        image, label, pred = (t[(slice(None), slice(None), *crop)] for t in (image, label, pred))
        if model is not None and image.shape[2] >= patch:
            score = _ForegroundScore(model)
            # activate=False: MONAI's default softmax over a single score would make every map 1.0
            sens = OcclusionSensitivity(score, mask_size=max(4, patch // 8), n_batch=16, verbose=False,
                                        overlap=0.5, activate=False)
            with warnings.catch_warnings():  # MONAI's own indexing deprecation notices
                warnings.simplefilter("ignore", UserWarning)
                # how much hiding each region lowers the foreground score
                occlusion = (score(image.float())[0, 0] - sens(image.float())[0][0, 0]).detach().numpy()
    pixels = image[0].numpy()
    panels = [(overlay_image(pixels, np.zeros(pixels.shape[1:], np.int64)), None, {}),
              (overlay_image(pixels, label[0, 0].numpy()), None, {}),
              (overlay_image(pixels, pred[0, 0].numpy()), None, {})]
    if occlusion is not None:
        bound = float(np.abs(occlusion).max()) or 1.0
        panels.append((occlusion, "coolwarm", {"vmin": -bound, "vmax": bound}))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.6), dpi=90)
    for ax, (data, cmap, limits) in zip(axes, panels):
        ax.imshow(data, cmap=cmap, **limits)
        ax.axis("off")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
