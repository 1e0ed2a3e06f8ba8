"""Transfer learning from a local weights file: what loaded, what was skipped, and why."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# A backbone-only file (torchvision ResNet, timm, a lab's own) names the body's tensors bare.
PREFIXES = ("", "backbone.body.")
WRAPPERS = ("state_dict", "model", "model_state_dict")  # keys checkpoints nest a state dict under


class WeightsError(ValueError):
    """The weights file cannot be read or fits no tensor of the model; the message names it."""


@dataclass
class WeightsReport:
    """What ``load_pretrained`` did, tensor by tensor.

    Args:
        path: the file.
        loaded: model keys that took the file's values.
        skipped: file keys not used, with the reason (no such tensor, shape mismatch).
    """

    path: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs."""
        line = f"{self.path}: loaded {len(self.loaded)} tensor(s), skipped {len(self.skipped)}"
        if self.skipped:
            first = list(self.skipped.items())[:3]
            line += " (e.g. " + "; ".join(f"{k}: {why}" for k, why in first) + ")"
        return line

    def to_dict(self) -> dict[str, object]:
        """For run.json."""
        return {"path": self.path, "loaded": len(self.loaded), "skipped": len(self.skipped),
                "skipped_keys": dict(list(self.skipped.items())[:50])}


def load_pretrained(model: nn.Module, path: str | Path) -> WeightsReport:
    """Copy every tensor of a local state dict that fits ``model`` (same name and shape).

    Accepts a full model state dict, a backbone-only one (ResNet names such as ``layer1.0.conv1
    .weight`` map to ``backbone.body.*``), a fedseg ``global.pt``, and checkpoints that nest the
    state dict under ``state_dict``/``model``; a ``module.`` (DataParallel) prefix is removed.

    Raises:
        WeightsError: missing or unreadable file, no state dict inside, or no tensor that fits.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights {path}: file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is not usable weights
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise WeightsError(f"pretrained weights {path}: not a PyTorch weights file ({reason})") from None
    state = _state_dict(raw)
    if state is None:
        raise WeightsError(f"pretrained weights {path}: holds no state dict (name -> tensor)")
    target = model.state_dict()
    report = WeightsReport(str(path))
    updates: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        names = [p + key for p in PREFIXES if p + key in target]
        if not names:
            report.skipped[key] = "no tensor of that name in the model"
        elif target[names[0]].shape != value.shape:
            report.skipped[key] = (f"shape {tuple(value.shape)} in the file, "
                                   f"{tuple(target[names[0]].shape)} in the model")
        else:
            updates[names[0]] = value.to(target[names[0]].dtype)
            report.loaded.append(names[0])
    if not updates:
        example = next(iter(report.skipped.items()), ("-", "empty file"))
        raise WeightsError(f"pretrained weights {path}: none of its {len(state)} tensor(s) fit this "
                           f"model (e.g. {example[0]}: {example[1]}); is it for another architecture?")
    model.load_state_dict(updates, strict=False)
    log.info("pretrained weights %s", report.summary())
    return report


def _state_dict(raw: object) -> dict[str, torch.Tensor] | None:
    for _ in range(2):  # a fedseg checkpoint or a trainer's checkpoint nests it once
        if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            return raw
        if not isinstance(raw, dict):
            return None
        raw = next((raw[k] for k in WRAPPERS if k in raw), None)
    return None
