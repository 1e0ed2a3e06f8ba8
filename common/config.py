"""Run-config schema: one frozen, validated dataclass for every run-config key (ARCHITECTURE §3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean")
LOCAL_LAYERS = ("none", "norm", "norm+head")
MODELS = ("unet", "maskrcnn")
BACKBONES = ("slim", "resnet50")
NORMS = ("instance", "batch", "group", "frozen")
DP_MODES = ("off", "sample", "client")


class ConfigError(ValueError):
    """A run-config key has a bad value; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    """Every tunable of a run, parsed once from Flower's run-config (kebab-case keys).

    Args:
        study_dir: study folder (simulation only: maps partition-id -> site folder).
        split_site: >0 splits a single-site study into this many virtual sites.
        num_server_rounds: federated rounds, >= 1.
        local_epochs: passes over the site's training cases per round, >= 1.
        batch_size: cases per optimizer step, >= 1.
        lr: local SGD learning rate, > 0.
        seed: seeds every RNG (split, init, sampling, augmentation).
        model: ``unet`` (semantic) or ``maskrcnn`` (instance sites, 2D).
        backbone: Mask R-CNN backbone: ``slim`` (ResNet-18 body, 64-channel FPN and heads; trains
            on CPU) or ``resnet50`` (torchvision's ResNet-50-FPN layout, for GPU sites).
        pretrained_weights: a local state dict (backbone-only or full) loaded into the initial
            global model by the server; empty: random initialization. Nothing is ever downloaded.
        spatial_dims: 2 or 3; 0 takes it from the sites' dataset.json.
        patch_size: training patch / sliding-window ROI edge in pixels, >= 16.
        channels: U-Net feature channels per level, e.g. ``(8, 16, 32)``.
        norm: ``instance`` (affine, DP-compatible), ``batch``, ``group``, or ``frozen``
            (Mask R-CNN only: BatchNorm statistics frozen at their pretrained values).
        strategy: one of ``fedavg``, ``fedprox``, ``fedadam``, ``fedmedian``, ``trimmed-mean``.
        proximal_mu: FedProx proximal weight, >= 0.
        server_lr: FedAdam server learning rate (eta), > 0.
        local_layers: ``none``, ``norm`` (FedBN) or ``norm+head``: layers that never leave a site.
        fraction_train: fraction of training sites sampled per round, in (0, 1].
        min_train_sites: fewest training sites a round needs, >= 1.
        round_timeout: seconds to wait for site replies per round, > 0.
        val_fraction: share of a site's training cases held out for its validation, in (0, 1).
        dp: ``off``; ``sample``: record-level DP-SGD at every site (Opacus, one case = one unit);
            ``client``: site-level DP, Flower's client-side clipping + server-side noise.
        dp_noise_multiplier: Gaussian noise / clipping norm, >= 0 (> 0 for ``client``).
        dp_max_grad_norm: per-case (``sample``) or per-update (``client``) clipping norm, > 0.
        dp_delta: delta that epsilon is reported at, in (0, 1).
        dp_target_epsilon: > 0 lets each site derive its noise for all planned rounds (``sample``).
        heldout_sites: sites that only ever evaluate (scored plain and after test-time
            adaptation of BatchNorm statistics on their own unlabeled images).
        min_group_cases: fewest cases a fairness group needs before its Dice is reported, >= 1.
        output_dir: parent folder of run folders.
        run_name: run folder name; empty picks ``<study>-<strategy>-<timestamp>``.
        resume: continue ``output_dir/run_name`` from its last checkpoint.
    """

    study_dir: str = ""
    split_site: int = 0
    num_server_rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 4
    lr: float = 0.01
    seed: int = 0
    model: str = "unet"
    backbone: str = "slim"
    pretrained_weights: str = ""
    spatial_dims: int = 0
    patch_size: int = 64
    channels: tuple[int, ...] = (8, 16, 32)
    norm: str = "instance"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    local_layers: str = "norm"
    fraction_train: float = 1.0
    min_train_sites: int = 2
    round_timeout: float = 3600.0
    val_fraction: float = 0.25
    dp: str = "off"
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_target_epsilon: float = 0.0
    heldout_sites: tuple[str, ...] = field(default_factory=tuple)
    min_group_cases: int = 5
    output_dir: str = "runs"
    run_name: str = ""
    resume: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("split-site", self.split_site >= 0, "must be >= 0"),
            ("num-server-rounds", self.num_server_rounds >= 1, "must be >= 1"),
            ("local-epochs", self.local_epochs >= 1, "must be >= 1"),
            ("batch-size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("model", self.model in MODELS, f"must be one of {MODELS}"),
            ("backbone", self.backbone in BACKBONES, f"must be one of {BACKBONES}"),
            ("norm", not (self.model == "unet" and self.norm == "frozen"),
             "'frozen' (pretrained BatchNorm statistics) is for model=maskrcnn"),
            ("norm", not (self.model == "maskrcnn" and self.norm == "batch"),
             "Mask R-CNN trains on 1-4 crops per step, too few for BatchNorm statistics; use "
             "group, instance, or frozen (statistics of the pretrained weights)"),
            ("spatial-dims", not (self.model == "maskrcnn" and self.spatial_dims == 3),
             "model=maskrcnn is 2D only"),
            ("spatial-dims", self.spatial_dims in (0, 2, 3), "must be 2, 3 or 0 (from the data)"),
            ("patch-size", self.patch_size >= 16, "must be >= 16"),
            ("channels", len(self.channels) >= 2 and all(c >= 1 for c in self.channels),
             "needs at least two positive channel counts, e.g. '8,16,32'"),
            ("norm", self.norm in NORMS, f"must be one of {NORMS}"),
            ("strategy", self.strategy in STRATEGIES, f"must be one of {STRATEGIES}"),
            ("proximal-mu", self.proximal_mu >= 0, "must be >= 0"),
            ("server-lr", self.server_lr > 0, "must be > 0"),
            ("local-layers", self.local_layers in LOCAL_LAYERS, f"must be one of {LOCAL_LAYERS}"),
            ("fraction-train", 0 < self.fraction_train <= 1, "must be in (0, 1]"),
            ("min-train-sites", self.min_train_sites >= 1, "must be >= 1"),
            ("round-timeout", self.round_timeout > 0, "must be > 0"),
            ("val-fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("dp", self.dp in DP_MODES, f"must be one of {DP_MODES}"),
            ("dp-noise-multiplier", self.dp_noise_multiplier >= 0, "must be >= 0"),
            ("dp-max-grad-norm", self.dp_max_grad_norm > 0, "must be > 0"),
            ("dp-delta", 0 < self.dp_delta < 1, "must be in (0, 1)"),
            ("min-group-cases", self.min_group_cases >= 1, "must be >= 1"),
            ("dp-target-epsilon", self.dp_target_epsilon >= 0, "must be >= 0 (0: use dp-noise-multiplier)"),
            ("norm", not (self.dp == "sample" and self.norm == "batch"),
             "BatchNorm cannot train under DP-SGD (a case's output depends on its batch-mates); "
             "use norm=instance or norm=group with dp=sample"),
            ("strategy", not (self.dp == "sample" and self.strategy == "fedprox"),
             "fedprox with dp=sample is not supported: Opacus' per-case gradients do not carry "
             "the proximal term"),
            ("strategy", not (self.dp == "client" and self.strategy != "fedavg"),
             "dp=client needs strategy=fedavg (Flower's client-level accountant requires it)"),
            ("dp-noise-multiplier", not (self.dp == "client" and self.dp_noise_multiplier <= 0),
             "must be > 0 with dp=client"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"run-config '{key}' = {getattr(self, _attr(key))!r}: {why}")
        if self.model == "unet" and self.patch_size % 2 ** (len(self.channels) - 1):
            raise ConfigError(
                f"run-config 'patch-size' = {self.patch_size}: must be divisible by "
                f"{2 ** (len(self.channels) - 1)} (2 ** number of U-Net downsamplings)"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Parse kebab-case run-config values (from pyproject, ``--run-config`` or CLI flags).

        Raises:
            ConfigError: on an unknown key or a value of the wrong type or range.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            attr = _attr(key)
            if attr not in known:
                raise ConfigError(
                    f"unknown run-config key '{key}'; known keys: {', '.join(sorted(keys()))}"
                )
            values[attr] = _coerce(key, known[attr].type, value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict of every key (lists for tuples), the inverse of ``from_dict``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def keys() -> list[str]:
    """All run-config keys, kebab-case."""
    return [f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)]


def _attr(key: str) -> str:
    return key.replace("-", "_")


def _coerce(key: str, type_name: Any, value: Any) -> Any:
    type_name = str(type_name)
    try:
        if type_name == "bool":
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if type_name == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "str":
            return str(value)
        if type_name == "tuple[int, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) for v in items if str(v).strip())
        if type_name == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"run-config '{key}' = {value!r}: expected {type_name}") from None
    raise ConfigError(f"run-config '{key}': unsupported type {type_name}")
