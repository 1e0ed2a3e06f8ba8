"""The run configuration: every key a user sets for a run, parsed once from Flower's run-config
(kebab-case) into a frozen, validated dataclass whose errors name the key. Each key's meaning is
its field's help (``key``), which the command line's ``--help`` shows.

Nothing here imports torch or Flower: the command line parses and validates a run in
milliseconds.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from fedseg.common.devices import DEVICE
from fedseg.common.errors import ConfigError
from fedseg.common.lr_schedule import LR_SCHEDULES
from fedseg.common.model_kinds import AUTO_MODEL, BACKBONES, KINDS, MODELS, NORMS, PLANNED, ModelKind, ModelSpec
from fedseg.common.round_config import AUTO, DPSettings, SiteData, SiteRoundConfig
from fedseg.common.values import attr, coerce, kebab

__all__ = ["AUTO", "ConfigError", "RunConfig", "key_help", "key_metavar", "keys"]

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "trimmed-mean")
LOCAL_LAYERS = ("none", "norm", "norm+head")
DP_MODES = ("off", "sample", "client")
TRANSFER_DTYPES = ("float32", "float16")  # Flower carries NumPy arrays: no bfloat16
AMP_MODES = ("auto", "off", "bf16", "fp16")
HELDOUT_ADAPT = ("final", "every")  # held-out sites score after test-time adaptation: last round, each round
SPACINGS = ("auto", "native")
FLIPS = re.compile(r"auto|all|none|[0-2](,[0-2])*")
TRACKERS = ("tensorboard", "mlflow")
CHOICES = {"strategy": STRATEGIES, "local_layers": LOCAL_LAYERS, "model": MODELS, "backbone": BACKBONES,
           "norm": NORMS, "dp": DP_MODES, "lr_schedule": LR_SCHEDULES, "amp": AMP_MODES,
           "transfer_dtype": TRANSFER_DTYPES, "heldout_adapt": HELDOUT_ADAPT, "spacing": SPACINGS}


def key(default: Any, help: str, expert: bool = False) -> Any:  # noqa: A002 - argparse's word
    """A run-config key: its default and one line of help (``expert``: a DP recipe override that
    fedseg sets well by itself)."""
    meta = {"help": help, "expert": expert}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """Every tunable of a run, parsed once from Flower's run-config (kebab-case keys); each field's
    meaning is its ``help``."""

    study_dir: str = key("", "study folder (simulation only: maps partition-id -> site folder).")
    num_server_rounds: int = key(3, "federated rounds, >= 1.")
    local_epochs: int = key(1, "passes over the site's training cases per round, >= 1.")
    batch_size: int = key(4, "cases per optimizer step, >= 1.")
    lr: float = key(0.01, "local SGD learning rate, > 0.")
    lr_schedule: str = key(
        "constant",
        "constant, or cosine: round r of R trains at lr x (1 + cos(pi (r - 1) / R)) / 2, from lr down "
        "towards 0 (the pooled and local baselines follow the same schedule round by round); under "
        "dp=sample it scales the DP learning rate (dp-lr or the recipe's) the same way.")
    seed: int = key(0, "seeds every RNG (split, init, sampling, augmentation).")
    model: str = key(
        "unet",
        "auto: the U-Net nnU-Net's rules plan from the training sites' dataset fingerprints (MONAI's DynUNet "
        "with deep supervision: its stages, kernels, strides, features and patch; 'channels' and 'patch-size' "
        "are then not used); unet: MONAI's U-Net of 'channels' and 'patch-size'; maskrcnn: instance sites, 2D.")
    backbone: str = key(
        "slim",
        "Mask R-CNN backbone: slim (ResNet-18 body, 64-channel FPN and heads; trains on CPU) or resnet50 "
        "(torchvision's ResNet-50-FPN layout, for GPU sites).")
    pretrained_weights: str = key(
        "",
        "a local state dict (backbone-only or full) loaded into the initial global model by the server; "
        "empty: random initialization. Nothing is ever downloaded.")
    spatial_dims: int = key(0, "2 or 3; 0 takes it from the sites' dataset.json.")
    patch_size: int = key(64, "training patch / sliding-window ROI edge in pixels, >= 16.")
    channels: tuple[int, ...] = key((8, 16, 32), "U-Net feature channels per level, e.g. (8, 16, 32).")
    norm: str = key(
        "instance",
        "instance (affine, DP-compatible), batch, group, or frozen (Mask R-CNN only: BatchNorm statistics "
        "frozen at their pretrained values).")
    strategy: str = key("fedavg", "one of fedavg, fedprox, fedadam, fedmedian, trimmed-mean.")
    proximal_mu: float = key(0.01, "FedProx proximal weight, >= 0.")
    trim_fraction: float = key(
        0.2,
        "trimmed-mean: share of the sites' values cut from each end per weight, in (0, 0.5); a run where "
        "it cuts no site (fraction x training sites < 1) is refused.")
    server_lr: float = key(0.01, "FedAdam server learning rate (eta), > 0.")
    local_layers: str = key("norm", "none, norm (FedBN) or norm+head: layers that never leave a site.")
    fraction_train: float = key(1.0, "fraction of training sites sampled per round, in (0, 1].")
    min_train_sites: int = key(2, "fewest training sites a round needs, >= 1.")
    round_timeout: float = key(3600.0, "seconds to wait for site replies per round, > 0.")
    val_fraction: float = key(
        0.25,
        "share of a site's training cases held out for its validation, in (0, 1).")
    augment: bool = key(
        False,
        "random appearance changes while training (intensity, contrast, noise, blur, a bias field for "
        "MRI/CT, a colour jitter for RGB H&E): robustness to other hospitals.")
    flips: str = key(
        "auto",
        "spatial axes training patches are randomly mirrored along: auto (none for scanner images and 3D "
        "volumes, which keep the patient's orientation; every axis for other 2D images: histology, "
        "photographs), all, none, or axes such as 0,2; fedseg predict's test-time flips follow the run's.")
    spacing: str = key(
        "auto",
        "the voxel grid a U-Net trains and predicts on: auto (the plan's target spacing, where the sites' "
        "files carry one in mm: every site resamples its images to it, labels nearest-neighbour, and "
        "scores and predictions come back in each image's own geometry), native (each image's own grid).")
    dp: str = key(
        "off",
        "off; sample: record-level DP-SGD at every site (Opacus, one case = one unit); client: site-level "
        "DP, Flower's client-side clipping + server-side noise.")
    dp_noise_multiplier: float = key(1.0, "Gaussian noise / clipping norm, >= 0 (> 0 for client).")
    dp_max_grad_norm: float = key(
        -1.0,
        "per-case (sample) or per-update (client) clipping norm, > 0; -1: the DP recipe's (dp_recipe.py), "
        "1.0 for client.")
    dp_delta: float = key(1e-5, "delta that epsilon is reported at, in (0, 1).")
    dp_target_epsilon: float = key(
        0.0,
        "> 0 lets each site derive its noise for all planned rounds (sample).")
    dp_batch_size: int = key(
        -1,
        "expected cases per DP-SGD step (Poisson sampling), >= 1; -1: the recipe's.", expert=True)
    dp_lr: float = key(-1.0, "SGD learning rate under dp=sample, > 0; -1: the recipe's.", expert=True)
    dp_momentum: float = key(-1.0, "SGD momentum under dp=sample, in [0, 1); -1: the recipe's.", expert=True)
    dp_patches_per_case: int = key(
        -1,
        "random patches of a case whose gradients are averaged before clipping (the unit stays the case), "
        ">= 1; -1: the recipe's.", expert=True)
    dp_steps: int = key(-1, "DP-SGD steps per round at each site, >= 1; -1: the recipe's.", expert=True)
    dp_ema: float = key(
        -1.0,
        "decay per round of the server's moving average of the global model, which is what sites evaluate "
        "and what the run saves, in [0, 1) (0: none); -1: the recipe's (0.7) under dp=sample from "
        "pretrained weights, none otherwise.", expert=True)
    heldout_sites: tuple[str, ...] = key(
        (),
        "sites that only ever evaluate (scored plain and after test-time adaptation of BatchNorm "
        "statistics on their own unlabeled images).")
    heldout_adapt: str = key(
        "final",
        "when held-out sites also score after test-time adaptation (which takes as long as scoring again): "
        "final (the last round only) or every (each round they score).")
    evaluate_every: int = key(
        1,
        "score the model every K rounds, >= 1; the last round is always scored (training sites score a "
        "round's model on their validation cases, held-out sites on all theirs).")
    heldout_ensemble: int = key(
        0,
        "K >= 2 also scores held-out sites with the ensemble of the last K rounds' models (class "
        "probabilities averaged; the server sends them the K - 1 earlier models too, never to training "
        "sites); 0: off. U-Net only.")
    min_group_cases: int = key(
        5,
        "fewest cases a fairness group needs before its Dice is reported, >= 1; a site whose policy sets a "
        "higher floor (node config min-group-cases) keeps its own.")
    device: str = key(
        "auto",
        "auto (CUDA where present), cpu, cuda or cuda:N for training, evaluation and prediction; a "
        "hospital's node config device wins.")
    amp: str = key(
        "auto",
        "mixed precision of training and inference: auto (bf16 on a CUDA device that supports it, else "
        "fp16 there; on a CPU bf16 where it has bf16 units (AVX512-BF16, AMX), else off), off, bf16, fp16 "
        "(CUDA only); training under dp=sample stays float32.")
    deterministic: bool = key(
        False,
        "bit-exact repeatable CUDA kernels (cuDNN autotuning off); CPU runs are seeded and repeatable "
        "either way.")
    compile: bool = key(
        False,
        "torch.compile the U-Net's training forward (not Mask R-CNN, not dp=sample): faster steps once "
        "compiled, but a network's first compile on a machine costs each site process about half a "
        "minute (cached on disk for later rounds and runs); pays off over long local training.")
    step_memory_mb: int = key(
        64,
        "MiB of activations one forward pass of a CPU site's training step may keep for the backward "
        "pass; a batch that would keep more trains in parts whose gradients add up to the whole batch's "
        "(U-Net with instance or group norm; 0: whole batches). Bounds a site process's memory.")
    transfer_dtype: str = key(
        "float32",
        "precision of the shared weights on the wire, both ways: float32 or float16 (half the bytes; "
        "sites train and the server aggregates in float32 either way, and DP noise is added before the "
        "cast).")
    tracking: str = key(
        "",
        "where else the coordinator logs every round's per-site and mean metrics: tensorboard (event files "
        "in the run folder's tensorboard/), mlflow, or both as tensorboard,mlflow; empty: rounds.jsonl and "
        "the report only. Needs pip install 'fedseg[tracking]'.")
    mlflow_uri: str = key(
        "",
        "MLflow tracking URI for tracking=mlflow (a tracking server, or a database such as "
        "sqlite:////srv/mlflow.db); empty: a SQLite file mlflow.db in the run folder.")
    output_dir: str = key("runs", "parent folder of run folders (server only).")
    run_name: str = key("", "run folder name; empty picks <study>-<strategy>-<timestamp>.")
    resume: bool = key(False, "continue output_dir/run_name from its last checkpoint (server only).")

    def __post_init__(self) -> None:
        kind = self.model_kind
        checks: list[tuple[str, bool, str]] = [
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
            ("step-memory-mb", self.step_memory_mb >= 0, "must be >= 0 (0: whole batches)"),
            ("tracking", all(t in TRACKERS for t in self.trackers()),
             f"must be empty or a comma-separated list of {TRACKERS}"),
            ("val-fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("spacing", self.spacing in SPACINGS, f"must be one of {SPACINGS}"),
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
            ("heldout-adapt", self.heldout_adapt in HELDOUT_ADAPT, f"must be one of {HELDOUT_ADAPT}"),
            ("evaluate-every", self.evaluate_every >= 1, "must be >= 1"),
            ("heldout-ensemble", self.heldout_ensemble == 0 or self.heldout_ensemble >= 2,
             "must be 0 (off) or >= 2 (rounds whose models are averaged)"),
            ("heldout-ensemble", not (self.heldout_ensemble and kind is not None and not kind.dense),
             f"model={self.model} has no per-pixel class probabilities to ensemble"),
            ("device", DEVICE.fullmatch(self.device) is not None, "must be auto, cpu, cuda or cuda:N"),
            ("transfer-dtype", self.transfer_dtype in TRANSFER_DTYPES, f"must be one of {TRANSFER_DTYPES}"),
            ("amp", self.amp in AMP_MODES, f"must be one of {AMP_MODES}"),
            ("compile", not (self.compile and self.dp == "sample"),
             "dp=sample trains with per-case gradients, which torch.compile does not trace"),
            ("compile", not (self.compile and kind is not None and not kind.dense),
             f"model={self.model} is not compiled (only U-Net training is)"),
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
                raise ConfigError(f"run-config '{key}' = {getattr(self, attr(key))!r}: {why}")
        if self.model != AUTO_MODEL and kind is not None and kind.downsamples and (
                self.patch_size % 2 ** (len(self.channels) - 1)):
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
            name = attr(key)
            if name not in known:
                raise ConfigError(
                    f"unknown run-config key '{key}'; known keys: {', '.join(sorted(keys()))}"
                )
            values[name] = coerce(key, known[name].type, value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict of every key (lists for tuples), the inverse of ``from_dict``."""
        return {kebab(f.name): list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @property
    def model_kind(self) -> ModelKind | None:
        """The registry's entry for the model this run builds (None for an unknown ``model``)."""
        return KINDS.get(PLANNED if self.model == AUTO_MODEL else self.model)

    def trackers(self) -> tuple[str, ...]:
        """The trackers ``tracking`` names, in its order."""
        return tuple(t.strip() for t in self.tracking.split(",") if t.strip())

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def network(self, spatial_dims: int, in_channels: int, out_channels: int,
                plans: dict[str, Any] | None = None) -> tuple[ModelSpec, tuple[int, ...]]:
        """The run's model and its patch (one size per axis) for data of this shape; ``model=auto``
        takes both from ``plans`` (plan.json's configurations: the one for these dims).

        Raises:
            ConfigError: model=auto without a plan.
        """
        if self.model != AUTO_MODEL:
            return (ModelSpec(spatial_dims, in_channels, out_channels, self.channels, self.norm, self.model,
                              self.backbone, self.patch_size), (self.patch_size,) * spatial_dims)
        plan = (plans or {}).get(f"{spatial_dims}d")
        if plan is None:
            raise ConfigError(f"run-config 'model' = 'auto' needs a {spatial_dims}D plan made from the training "
                              "sites' dataset fingerprints, and there is none (see the discovery log); set "
                              "model=unet with 'channels' and 'patch-size' instead")
        features = tuple(int(f) for f in plan["features"])
        # nnU-Net weights its decoder's outputs 1, 1/2, 1/4, ... and gives the coarsest 0
        spec = ModelSpec(spatial_dims, in_channels, out_channels, features, self.norm, PLANNED,
                         kernels=tuple(tuple(int(k) for k in ks) for ks in plan["kernels"]),
                         strides=tuple(tuple(int(s) for s in ss) for ss in plan["strides"]),
                         deep_supervision=max(0, len(features) - 3))
        return spec, tuple(int(p) for p in plan["patch_size"])

    def site_data(self, state_root: str = "", site_cache_mb: int = 0, split_site: int = 0) -> SiteData:
        """What every message tells a site about its data (simulation: where its folder is, how
        many virtual sites it is split into, where their state lives and how much decoded data
        each may keep across rounds)."""
        if not self.study_dir:
            return SiteData(self.seed, self.val_fraction)
        return SiteData(self.seed, self.val_fraction, self.study_dir, split_site, state_root, site_cache_mb)

    def site_round(self, model: ModelSpec, run_id: str, data: SiteData | None = None,
                   start_dice: float = -1.0, flip_axes: tuple[int, ...] = (),
                   patch: tuple[int, ...] = (), spacing: tuple[float, ...] = ()) -> SiteRoundConfig:
        """The typed round config every site receives: only what a site needs, nothing the
        server keeps to itself (output folder, its weights path, resume flags, strategy knobs);
        ``data``: which data the sites read (``site_data``; default: no simulation);
        ``start_dice``: what the pretrained weights scored at the training sites (DP's warm rate);
        ``flip_axes``: the run's ``flips`` resolved for the sites' data (``data.flip_axes``);
        ``patch``: one size per axis (default: ``patch-size`` along every axis);
        ``spacing``: the grid the sites resample to (``run_spacing``; empty: their own)."""
        return SiteRoundConfig(
            run_name=self.run_name, run_id=run_id, model=model, local_layers=self.local_layers,
            local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
            lr_schedule=self.lr_schedule, num_rounds=self.num_server_rounds,
            patch_size=patch or (self.patch_size,) * model.spatial_dims, augment=self.augment, flip_axes=flip_axes,
            spacing=spacing,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            min_group_cases=self.min_group_cases, heldout_sites=self.heldout_sites,
            evaluate_in_train=False, adapt_heldout=False,  # the server asks for them per message
            device=self.device, amp=self.amp, deterministic=self.deterministic, compile=self.compile,
            step_memory_mb=self.step_memory_mb,
            transfer_dtype=self.transfer_dtype, data=data or self.site_data(),
            dp=DPSettings(self.dp, self.dp_noise_multiplier, self.dp_max_grad_norm, self.dp_delta,
                          self.dp_target_epsilon, self.num_server_rounds, self.dp_batch_size,
                          self.dp_lr, self.dp_momentum, self.dp_patches_per_case,
                          bool(self.pretrained_weights), self.dp_steps,
                          start_dice if self.pretrained_weights else -1.0))


def keys() -> list[str]:
    """All run-config keys, kebab-case."""
    return [kebab(f.name) for f in dataclasses.fields(RunConfig)]


def key_metavar(name: str) -> str:
    """What a key's value looks like on the command line (N, X, TEXT, LIST)."""
    kind = str(next(f.type for f in dataclasses.fields(RunConfig) if kebab(f.name) == name))
    return {"int": "N", "float": "X", "bool": "BOOL"}.get(kind, "LIST" if "tuple" in kind else "TEXT")


def key_help() -> dict[str, tuple[str, bool]]:
    """Kebab-case key -> (one line for ``--help``: its meaning, choices and default; whether it is
    an expert setting)."""
    out = {}
    for f in dataclasses.fields(RunConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f.metadata["help"]
        if f.name in CHOICES:
            text += f" Choices: {', '.join(CHOICES[f.name])}."
        text = f"{text} Default: {shown if shown != '' else '(none)'}."
        out[kebab(f.name)] = (text.replace("%", "%%"), bool(f.metadata["expert"]))
    return out
