"""Run-config schema (ARCHITECTURE §3): the run config parsed once into a frozen, validated
dataclass, the model spec it implies, and the typed round config a site receives.

Nothing here imports torch or Flower: the command line parses and validates a run in
milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from fedseg.common.devices import DEVICE

AUTO = -1  # a DP training setting left to fedseg's DP recipe (common/dp_recipe.py)
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean")
LOCAL_LAYERS = ("none", "norm", "norm+head")
BACKBONES = ("slim", "resnet50")
DP_MODES = ("off", "sample", "client")
TRANSFER_DTYPES = ("float32", "float16")  # Flower carries NumPy arrays: no bfloat16
AMP_MODES = ("auto", "off", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
FLIPS = re.compile(r"auto|all|none|[0-2](,[0-2])*")


@dataclass(frozen=True)
class ModelKind:
    """What a model kind accepts; the one table that knows the kinds apart (the factories in
    ``models.py`` and ``client/tasks.py`` are keyed by the same names).

    Args:
        norms: accepted ``norm`` values.
        dims: accepted spatial dims.
        site_task: the dataset.json ``task`` every site must declare ("" for any).
        norm_note: why some norm is not accepted, for the error message.
        downsamples: the patch is halved once per ``channels`` level after the first, so it
            must be divisible by 2 ** (levels - 1).
        dense: predicts per-pixel class probabilities (which ensembles average).
    """

    norms: tuple[str, ...]
    dims: tuple[int, ...]
    site_task: str = ""
    norm_note: str = ""
    downsamples: bool = False
    dense: bool = False


MODEL_KINDS = {
    "unet": ModelKind(("instance", "batch", "group"), (2, 3), "",
                      "'frozen' (pretrained BatchNorm statistics) is for model=maskrcnn",
                      downsamples=True, dense=True),
    "maskrcnn": ModelKind(("group", "instance", "frozen"), (2,), "instance",
                          "Mask R-CNN trains on 1-4 crops per step, too few for BatchNorm "
                          "statistics; use group, instance, or frozen (statistics of the "
                          "pretrained weights)"),
}
MODELS = tuple(MODEL_KINDS)
NORMS = ("instance", "batch", "group", "frozen")


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
        lr_schedule: ``constant``, or ``cosine``: round r of R trains at lr x (1 + cos(pi (r - 1)
            / R)) / 2, from lr down towards 0 (the pooled and local baselines follow the same
            schedule round by round); under ``dp=sample`` it scales the DP learning rate
            (``dp-lr`` or the recipe's) the same way.
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
        trim_fraction: trimmed-mean: share of the sites' values cut from each end per weight, in
            (0, 0.5); a run where it cuts no site (fraction x training sites < 1) is refused.
        server_lr: FedAdam server learning rate (eta), > 0.
        local_layers: ``none``, ``norm`` (FedBN) or ``norm+head``: layers that never leave a site.
        fraction_train: fraction of training sites sampled per round, in (0, 1].
        min_train_sites: fewest training sites a round needs, >= 1.
        round_timeout: seconds to wait for site replies per round, > 0.
        val_fraction: share of a site's training cases held out for its validation, in (0, 1).
        augment: random appearance changes while training (intensity, contrast, noise, blur, a
            bias field for MRI/CT, a colour jitter for RGB H&E): robustness to other hospitals.
        flips: spatial axes training patches are randomly mirrored along: ``auto`` (none for
            scanner images and 3D volumes, which keep the patient's orientation; every axis for
            other 2D images: histology, photographs), ``all``, ``none``, or axes such as ``0,2``;
            ``fedseg predict``'s test-time flips follow the run's.
        site_cache_mb: MiB of decoded training cases a site process keeps across rounds
            (simulation workers; 0: read from disk every round), >= 0.
        dp: ``off``; ``sample``: record-level DP-SGD at every site (Opacus, one case = one unit);
            ``client``: site-level DP, Flower's client-side clipping + server-side noise.
        dp_noise_multiplier: Gaussian noise / clipping norm, >= 0 (> 0 for ``client``).
        dp_max_grad_norm: per-case (``sample``) or per-update (``client``) clipping norm, > 0;
            -1: the DP recipe's (``dp_recipe.py``), 1.0 for ``client``.
        dp_delta: delta that epsilon is reported at, in (0, 1).
        dp_target_epsilon: > 0 lets each site derive its noise for all planned rounds (``sample``).
        dp_batch_size: expected cases per DP-SGD step (Poisson sampling), >= 1; -1: the recipe's.
        dp_lr: SGD learning rate under ``dp=sample``, > 0; -1: the recipe's.
        dp_momentum: SGD momentum under ``dp=sample``, in [0, 1); -1: the recipe's.
        dp_patches_per_case: random patches of a case whose gradients are averaged before
            clipping (the unit stays the case), >= 1; -1: the recipe's.
        dp_steps: DP-SGD steps per round at each site, >= 1; -1: the recipe's.
        dp_ema: decay per round of the server's moving average of the global model, which is
            what sites evaluate and what the run saves, in [0, 1) (0: none); -1: the recipe's
            (0.7) under ``dp=sample`` from pretrained weights, none otherwise.
        heldout_sites: sites that only ever evaluate (scored plain and after test-time
            adaptation of BatchNorm statistics on their own unlabeled images).
        evaluate_in_train: training sites score the global model they receive at the start of
            the next round's train message instead of in an evaluation message of their own (one
            message per site and round; held-out sites and the last round are still evaluated
            separately); the same scores. Each round is checkpointed when its training ends and
            logged once the next round's training replies bring its scores (a resume completes
            the line). Runs whose server keeps a moving average (``dp-ema``: not the model sites
            train on) or samples sites (``fraction-train`` < 1) evaluate separately.
        heldout_ensemble: K >= 2 also scores held-out sites with the ensemble of the last K
            rounds' models (class probabilities averaged; the server sends them the K - 1 earlier
            models too, never to training sites); 0: off. U-Net only.
        min_group_cases: fewest cases a fairness group needs before its Dice is reported, >= 1.
        device: ``auto`` (CUDA where present), ``cpu``, ``cuda`` or ``cuda:N`` for training,
            evaluation and prediction; a hospital's node config ``device`` wins.
        gpus_per_site: simulation: GPU share of each virtual site (0.25 runs four sites on one GPU
            at once); -1: 1.0 where a GPU is present, else 0.
        amp: mixed precision of training and inference: ``auto`` (bf16 on a CUDA device that
            supports it, else fp16 there; off on CPU), ``off``, ``bf16``, ``fp16`` (CUDA only);
            training under ``dp=sample`` stays float32.
        deterministic: bit-exact repeatable CUDA kernels (cuDNN autotuning off); CPU runs are
            seeded and repeatable either way.
        transfer_dtype: precision of the shared weights on the wire, both ways: ``float32`` or
            ``float16`` (half the bytes; sites train and the server aggregates in float32 either
            way, and DP noise is added before the cast).
        pack_weights: send the weights of a message as one flat array per dtype plus a manifest
            instead of one array per tensor (Flower moves each array as requests of its own);
            sites pack their replies the way the server packed its message.
        output_dir: parent folder of run folders (server only).
        run_name: run folder name; empty picks ``<study>-<strategy>-<timestamp>``.
        resume: continue ``output_dir/run_name`` from its last checkpoint (server only).
    """

    study_dir: str = ""
    split_site: int = 0
    num_server_rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 4
    lr: float = 0.01
    lr_schedule: str = "constant"
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
    trim_fraction: float = 0.2
    server_lr: float = 0.01
    local_layers: str = "norm"
    fraction_train: float = 1.0
    min_train_sites: int = 2
    round_timeout: float = 3600.0
    val_fraction: float = 0.25
    augment: bool = False
    flips: str = "auto"
    site_cache_mb: int = 1024
    dp: str = "off"
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = -1.0
    dp_delta: float = 1e-5
    dp_target_epsilon: float = 0.0
    dp_batch_size: int = -1
    dp_lr: float = -1.0
    dp_momentum: float = -1.0
    dp_patches_per_case: int = -1
    dp_steps: int = -1
    dp_ema: float = -1.0
    heldout_sites: tuple[str, ...] = field(default_factory=tuple)
    heldout_ensemble: int = 0
    evaluate_in_train: bool = True
    min_group_cases: int = 5
    device: str = "auto"
    gpus_per_site: float = -1.0
    amp: str = "auto"
    deterministic: bool = False
    transfer_dtype: str = "float32"
    pack_weights: bool = True
    output_dir: str = "runs"
    run_name: str = ""
    resume: bool = False

    def __post_init__(self) -> None:
        kind = MODEL_KINDS.get(self.model)
        checks: list[tuple[str, bool, str]] = [
            ("split-site", self.split_site >= 0, "must be >= 0"),
            ("num-server-rounds", self.num_server_rounds >= 1, "must be >= 1"),
            ("local-epochs", self.local_epochs >= 1, "must be >= 1"),
            ("batch-size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("lr-schedule", self.lr_schedule in LR_SCHEDULES, f"must be one of {LR_SCHEDULES}"),
            ("model", kind is not None, f"must be one of {MODELS}"),
            ("backbone", self.backbone in BACKBONES, f"must be one of {BACKBONES}"),
            ("norm", self.norm in NORMS, f"must be one of {NORMS}"),
            ("norm", kind is None or self.norm in kind.norms,
             f"model={self.model} takes norm {kind.norms if kind else ()}: "
             f"{kind.norm_note if kind else ''}"),
            ("spatial-dims", self.spatial_dims in (0, 2, 3), "must be 2, 3 or 0 (from the data)"),
            ("spatial-dims", kind is None or self.spatial_dims in (0, *kind.dims),
             f"model={self.model} is {'/'.join(map(str, kind.dims)) if kind else ''}D only"),
            ("patch-size", self.patch_size >= 16, "must be >= 16"),
            ("channels", len(self.channels) >= 2 and all(c >= 1 for c in self.channels),
             "needs at least two positive channel counts, e.g. '8,16,32'"),
            ("strategy", self.strategy in STRATEGIES, f"must be one of {STRATEGIES}"),
            ("proximal-mu", self.proximal_mu >= 0, "must be >= 0"),
            ("trim-fraction", 0 < self.trim_fraction < 0.5, "must be in (0, 0.5)"),
            ("server-lr", self.server_lr > 0, "must be > 0"),
            ("local-layers", self.local_layers in LOCAL_LAYERS, f"must be one of {LOCAL_LAYERS}"),
            ("fraction-train", 0 < self.fraction_train <= 1, "must be in (0, 1]"),
            ("min-train-sites", self.min_train_sites >= 1, "must be >= 1"),
            ("round-timeout", self.round_timeout > 0, "must be > 0"),
            ("val-fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("site-cache-mb", self.site_cache_mb >= 0, "must be >= 0 (0: no cache)"),
            ("flips", FLIPS.fullmatch(self.flips) is not None,
             "must be auto, all, none or spatial axes such as 0,2"),
            ("dp", self.dp in DP_MODES, f"must be one of {DP_MODES}"),
            ("dp-noise-multiplier", self.dp_noise_multiplier >= 0, "must be >= 0"),
            ("dp-max-grad-norm", self.dp_max_grad_norm > 0 or self.dp_max_grad_norm == AUTO,
             "must be > 0 (or -1: fedseg's DP recipe)"),
            ("dp-batch-size", self.dp_batch_size >= 1 or self.dp_batch_size == AUTO,
             "must be >= 1 (or -1: fedseg's DP recipe)"),
            ("dp-lr", self.dp_lr > 0 or self.dp_lr == AUTO, "must be > 0 (or -1: fedseg's DP recipe)"),
            ("dp-momentum", 0 <= self.dp_momentum < 1 or self.dp_momentum == AUTO,
             "must be in [0, 1) (or -1: fedseg's DP recipe)"),
            ("dp-patches-per-case", self.dp_patches_per_case >= 1 or self.dp_patches_per_case == AUTO,
             "must be >= 1 (or -1: fedseg's DP recipe)"),
            ("dp-steps", self.dp_steps >= 1 or self.dp_steps == AUTO,
             "must be >= 1 (or -1: fedseg's DP recipe)"),
            ("dp-ema", 0 <= self.dp_ema < 1 or self.dp_ema == AUTO,
             "must be in [0, 1) (0: no averaging; -1: fedseg's DP recipe)"),
            ("dp-delta", 0 < self.dp_delta < 1, "must be in (0, 1)"),
            ("min-group-cases", self.min_group_cases >= 1, "must be >= 1"),
            ("heldout-ensemble", self.heldout_ensemble == 0 or self.heldout_ensemble >= 2,
             "must be 0 (off) or >= 2 (rounds whose models are averaged)"),
            ("heldout-ensemble", not (self.heldout_ensemble and kind is not None and not kind.dense),
             f"model={self.model} has no per-pixel class probabilities to ensemble"),
            ("device", DEVICE.fullmatch(self.device) is not None, "must be auto, cpu, cuda or cuda:N"),
            ("gpus-per-site", self.gpus_per_site >= 0 or self.gpus_per_site == AUTO,
             "must be >= 0 (or -1: 1.0 where a GPU is present)"),
            ("transfer-dtype", self.transfer_dtype in TRANSFER_DTYPES, f"must be one of {TRANSFER_DTYPES}"),
            ("amp", self.amp in AMP_MODES, f"must be one of {AMP_MODES}"),
            ("dp-target-epsilon", self.dp_target_epsilon >= 0, "must be >= 0 (0: use dp-noise-multiplier)"),
            ("norm", not (self.dp == "sample" and self.norm == "batch"),
             "BatchNorm cannot train under DP-SGD (a case's output depends on its batch-mates); "
             "use norm=instance or norm=group with dp=sample"),
            ("strategy", not (self.dp == "sample" and self.strategy == "fedprox"),
             "fedprox with dp=sample is not supported: Opacus' per-case gradients do not carry "
             "the proximal term"),
            ("strategy", not (self.dp == "client" and self.strategy != "fedavg"),
             "dp=client needs strategy=fedavg (Flower's client-level accountant requires it)"),
            ("transfer-dtype", not (self.dp == "client" and self.transfer_dtype != "float32"),
             "dp=client clips each site's update as it is sent (Flower's mod), which must see "
             "float32 weights; use transfer-dtype=float32"),
            ("dp-noise-multiplier", not (self.dp == "client" and self.dp_noise_multiplier <= 0),
             "must be > 0 with dp=client"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"run-config '{key}' = {getattr(self, _attr(key))!r}: {why}")
        if kind is not None and kind.downsamples and self.patch_size % 2 ** (len(self.channels) - 1):
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
        return _kebab_dict(self)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def site_data(self, state_root: str = "") -> SiteData:
        """What every message tells a site about its data (simulation: where its folder is)."""
        if not self.study_dir:
            return SiteData(self.seed, self.val_fraction)
        return SiteData(self.seed, self.val_fraction, self.study_dir, self.split_site, state_root)

    def site_round(self, model: ModelSpec, run_id: str, state_root: str = "",
                   start_dice: float = -1.0, flip_axes: tuple[int, ...] = ()) -> SiteRoundConfig:
        """The typed round config every site receives: only what a site needs, nothing the
        server keeps to itself (output folder, its weights path, resume flags, strategy knobs);
        ``start_dice``: what the pretrained weights scored at the training sites (DP's warm rate);
        ``flip_axes``: the run's ``flips`` resolved for the sites' data (``data.flip_axes``)."""
        return SiteRoundConfig(
            run_name=self.run_name, run_id=run_id, model=model, local_layers=self.local_layers,
            local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
            lr_schedule=self.lr_schedule, num_rounds=self.num_server_rounds,
            patch_size=self.patch_size, augment=self.augment, flip_axes=flip_axes,
            site_cache_mb=self.site_cache_mb,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            min_group_cases=self.min_group_cases, heldout_sites=self.heldout_sites,
            evaluate_in_train=False,  # the server asks for it per train message
            device=self.device, amp=self.amp, deterministic=self.deterministic,
            transfer_dtype=self.transfer_dtype, data=self.site_data(state_root),
            dp=DPSettings(self.dp, self.dp_noise_multiplier, self.dp_max_grad_norm, self.dp_delta,
                          self.dp_target_epsilon, self.num_server_rounds, self.dp_batch_size,
                          self.dp_lr, self.dp_momentum, self.dp_patches_per_case,
                          bool(self.pretrained_weights), self.dp_steps,
                          start_dice if self.pretrained_weights else -1.0))


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (saved beside every checkpoint).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for MRI/CT, 3 for H&E RGB).
        out_channels: classes including background.
        channels: feature channels per U-Net level.
        norm: ``instance`` (affine), ``batch``, ``group`` or ``frozen`` (Mask R-CNN).
        model: a key of ``MODEL_KINDS`` (``unet`` or ``maskrcnn``).
        backbone: Mask R-CNN backbone (``slim`` or ``resnet50``).
        image_size: Mask R-CNN crop/tile edge (its inputs are never resized).
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    channels: tuple[int, ...]
    norm: str = "instance"
    model: str = "unet"
    backbone: str = "slim"
    image_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON/pickle-safe form."""
        out = dataclasses.asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        """Inverse of ``to_dict``."""
        return cls(**{**raw, "channels": tuple(raw["channels"])})

    @classmethod
    def for_run(cls, cfg: RunConfig, spatial_dims: int, in_channels: int, out_channels: int) -> ModelSpec:
        """The run's model (architecture keys of ``cfg``) for data of this shape."""
        return cls(spatial_dims, in_channels, out_channels, cfg.channels, cfg.norm, cfg.model,
                   cfg.backbone, cfg.patch_size)

    @property
    def kind(self) -> ModelKind:
        """The rules of this model kind."""
        return MODEL_KINDS[self.model]


@dataclass(frozen=True)
class SiteData:
    """Which data a site reads and how it splits it; sent with every message.

    Args:
        seed: seeds the site's train/validation split (and, with the round, its sampling).
        val_fraction: share of training cases validated on.
        study_dir: simulation only: the study folder the virtual node's partition maps into.
        split_site: simulation only: virtual sites per folder.
        state_root: simulation only: where each virtual site keeps its state on this machine.
    """

    seed: int
    val_fraction: float
    study_dir: str = ""
    split_site: int = 0
    state_root: str = ""

    def to_record(self) -> dict[str, Any]:
        """Flat kebab-case dict for a Flower ConfigRecord."""
        return _flatten(self)

    @classmethod
    def from_record(cls, record: Any) -> SiteData:
        """Inverse of ``to_record`` (also reads the data section of a round config)."""
        return _unflatten(cls, dict(record))


@dataclass(frozen=True)
class DPSettings:
    """Record- or client-level DP as the server asks for it (the site's policy may refuse).
    ``AUTO`` (-1) leaves a training setting to the DP recipe (``dp_recipe.py``).

    Args:
        mode: ``off``, ``sample`` or ``client``.
        noise_multiplier: Gaussian noise / clipping norm.
        max_grad_norm: clipping norm C.
        delta: delta epsilon is reported at.
        target_epsilon: > 0: derive the noise for ``planned_rounds`` rounds.
        planned_rounds: the run's number of rounds.
        batch_size: expected cases per DP-SGD step.
        lr: SGD learning rate under DP.
        momentum: SGD momentum under DP.
        patches_per_case: patches per case whose gradients are averaged before clipping.
        warm_start: the run starts from pretrained weights (the recipe then takes smaller steps).
        steps: DP-SGD steps per round.
        start_dice: the pretrained model's mean Dice at the training sites before round 1 (-1:
            not scored); the recipe's warm-start steps are the smaller the better it is.
    """

    mode: str = "off"
    noise_multiplier: float = 1.0
    max_grad_norm: float = AUTO
    delta: float = 1e-5
    target_epsilon: float = 0.0
    planned_rounds: int = 1
    batch_size: int = AUTO
    lr: float = AUTO
    momentum: float = AUTO
    patches_per_case: int = AUTO
    warm_start: bool = False
    steps: int = AUTO
    start_dice: float = -1.0


@dataclass(frozen=True)
class SiteRoundConfig:
    """What a site needs for a round, parsed once from the message's ConfigRecord.

    Args:
        run_name: the federation's run name (the site keys its local layers by it and run_id).
        run_id: unique id of the run, fixed at its start and kept across resumes.
        model: the network to build.
        local_layers: which layers stay at the site.
        local_epochs, batch_size, lr, patch_size, augment: training schedule.
        flip_axes: spatial axes training patches are randomly mirrored along.
        lr_schedule, num_rounds: how ``lr`` changes over the run's rounds (``round_lr``).
        site_cache_mb: decoded training cases kept across rounds in one process.
        proximal_mu: FedProx weight (0 unless the strategy is FedProx).
        min_group_cases: k-case threshold for fairness groups.
        heldout_sites: sites that only evaluate (they also score after norm adaptation).
        evaluate_in_train: score the received global model before training (``EVAL_PREFIX``
            metrics); the server sets it in a train message when the last round awaits its scores.
        device: the server's device wish (a site's own node config ``device`` wins).
        amp, deterministic: mixed precision and cuDNN mode (``common/precision.py``).
        transfer_dtype: precision the site sends its shared weights in.
        data: the site's data and split.
        dp: differential privacy asked for.
    """

    run_name: str
    run_id: str
    model: ModelSpec
    local_layers: str
    local_epochs: int
    batch_size: int
    lr: float
    lr_schedule: str
    num_rounds: int
    patch_size: int
    augment: bool
    flip_axes: tuple[int, ...]
    site_cache_mb: int
    proximal_mu: float
    min_group_cases: int
    heldout_sites: tuple[str, ...]
    evaluate_in_train: bool
    device: str
    amp: str
    deterministic: bool
    transfer_dtype: str
    data: SiteData
    dp: DPSettings

    def round_lr(self, server_round: int) -> float:
        """The learning rate of round ``server_round`` (1-based) under ``lr_schedule``."""
        return self.lr * self.lr_factor(server_round)

    def lr_factor(self, server_round: int) -> float:
        """What ``lr_schedule`` multiplies a learning rate by in round ``server_round`` (the DP
        learning rate too)."""
        return round_lr(1.0, self.lr_schedule, server_round, self.num_rounds)

    def to_record(self) -> dict[str, Any]:
        """Flat kebab-case dict for a Flower ConfigRecord (sections prefixed, lists kept)."""
        return _flatten(self)

    @classmethod
    def from_record(cls, record: Any) -> SiteRoundConfig:
        """Inverse of ``to_record``; keys Flower adds (``server-round``, ...) are ignored.

        Raises:
            ConfigError: a key is missing (server and site run different fedseg versions).
        """
        return _unflatten(cls, dict(record))


def round_lr(lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """``lr`` in round ``server_round`` of ``num_rounds``: constant, or cosine-decayed."""
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (server_round - 1) / max(num_rounds, 1))) / 2
    return lr


def keys() -> list[str]:
    """All run-config keys, kebab-case."""
    return [_kebab(f.name) for f in dataclasses.fields(RunConfig)]


def key_metavar(key: str) -> str:
    """What a key's value looks like on the command line (N, X, TEXT, LIST)."""
    kind = str(next(f.type for f in dataclasses.fields(RunConfig) if _kebab(f.name) == key))
    return {"int": "N", "float": "X", "bool": "BOOL"}.get(kind, "LIST" if "tuple" in kind else "TEXT")


def key_help() -> dict[str, str]:
    """Kebab-case key -> one line for ``--help``: its meaning (from ``RunConfig``'s docstring),
    default and choices."""
    lines = (RunConfig.__doc__ or "").split("Args:")[1].splitlines()
    meaning: dict[str, str] = {}
    current = ""
    for line in lines:
        head, _, rest = line.strip().partition(": ")
        if line.startswith(" " * 8 + head) and not line.startswith(" " * 9) and rest:
            current = head
            meaning[current] = rest
        elif current and line.strip():
            meaning[current] += " " + line.strip()
    choices = {"strategy": STRATEGIES, "local_layers": LOCAL_LAYERS, "model": MODELS,
               "backbone": BACKBONES, "norm": NORMS, "dp": DP_MODES}
    out = {}
    for f in dataclasses.fields(RunConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = meaning.get(f.name, "")
        if f.name in choices:
            text += f" Choices: {', '.join(choices[f.name])}."
        text = f"{text} Default: {shown if shown != '' else '(none)'}."
        out[_kebab(f.name)] = text.replace("``", "").replace("%", "%%")
    return out


# Nested sections of the round config and the prefix of their keys on the wire.
_SECTIONS = {"model": "model-", "data": "", "dp": "dp-"}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _flatten(value, prefix + _SECTIONS[f.name])
        else:
            out[_key(prefix, f.name)] = list(value) if isinstance(value, tuple) else value
    return out


def _unflatten(cls: type, record: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = _unflatten(kind, record, prefix + _SECTIONS[f.name])
            continue
        key = _key(prefix, f.name)
        if key not in record:
            raise ConfigError(f"round config from the server lacks '{key}' (do the server and "
                              "this site run the same fedseg version?)")
        values[f.name] = _coerce(key, kind, record[key])
    return cls(**values)


def _key(prefix: str, name: str) -> str:
    """``model-`` + ``norm`` -> ``model-norm``; ``model-`` + ``model`` -> ``model``."""
    return _kebab(name) if f"{_kebab(name)}-" == prefix else prefix + _kebab(name)


def _kebab_dict(obj: Any) -> dict[str, Any]:
    return {_kebab(f.name): list(v) if isinstance(v := getattr(obj, f.name), tuple) else v
            for f in dataclasses.fields(obj)}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _attr(key: str) -> str:
    return key.replace("-", "_")


def _coerce(key: str, kind: Any, value: Any) -> Any:
    type_name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    if type_name == "tuple":
        type_name = str(kind).replace("typing.", "")
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
