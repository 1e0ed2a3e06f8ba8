"""The round contract: what the server tells a site with every message (``SiteRoundConfig``: the
model, the schedule, the DP it asks for, which data to read), as a flat Flower ConfigRecord.

This is the server-to-site half of the privacy boundary: a site receives only what it needs,
never the server's own settings (output folder, its weights path, resume flags, strategy knobs).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from fedseg.common.errors import ConfigError
from fedseg.common.lr_schedule import round_lr
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.values import coerce, kebab, nested_text

AUTO = -1  # a DP training setting left to fedseg's DP recipe (common/dp_recipe.py)
# simulation: decoded training cases a site process keeps across rounds, by default: none (every
# process would keep each site it served; reading a round's cases again cost MoNuSeg's sites about
# 1% of their round)
SITE_CACHE_MB = 0


def epoch_steps(num_cases: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``num_cases`` in batches of ``batch_size`` (the
    last batch of a pass may be smaller): a round's steps without record-level DP."""
    return epochs * -(-num_cases // batch_size)


@dataclass(frozen=True)
class SiteData:
    """Which data a site reads and how it splits it; sent with every message.

    Args:
        seed: seeds the site's train/validation split (and, with the round, its sampling).
        val_fraction: share of training cases validated on.
        study_dir: simulation only: the study folder the virtual node's partition maps into.
        split_site: simulation only: virtual sites per folder.
        state_root: simulation only: where each virtual site keeps its state on this machine.
        site_cache_mb: simulation only: MiB of decoded training cases a site process keeps
            across rounds (a deployed site starts a new process for every message).
    """

    seed: int
    val_fraction: float
    study_dir: str = ""
    split_site: int = 0
    state_root: str = ""
    site_cache_mb: int = 0

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
        local_epochs, batch_size, lr, augment: training schedule.
        patch_size: training patch / sliding-window ROI, one size per spatial axis.
        flip_axes: spatial axes training patches are randomly mirrored along.
        spacing: the voxel spacing (mm per axis) sites resample their images to; empty: none.
        lr_schedule, num_rounds: how ``lr`` changes over the run's rounds (``round_lr``).
        proximal_mu: FedProx weight (0 unless the strategy is FedProx).
        min_group_cases: k-case threshold for fairness groups.
        heldout_sites: sites that only evaluate.
        evaluate_in_train: score the received global model before training (``EVAL_PREFIX``
            metrics); the server sets it in a train message when the last round awaits its scores.
        adapt_heldout: a held-out site also scores after test-time adaptation of its norms; the
            server sets it in the rounds run-config ``heldout-adapt`` names.
        device: the server's device wish (a site's own node config ``device`` wins).
        amp, deterministic: mixed precision and cuDNN mode (``common/precision.py``).
        compile: ``torch.compile`` the training forward (``client/trainer.py``).
        step_memory_mb: MiB of activations a CPU training step's forward pass may keep
            (``client/step_memory.py``).
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
    patch_size: tuple[int, ...]
    augment: bool
    flip_axes: tuple[int, ...]
    spacing: tuple[float, ...]
    proximal_mu: float
    min_group_cases: int
    heldout_sites: tuple[str, ...]
    evaluate_in_train: bool
    adapt_heldout: bool
    device: str
    amp: str
    deterministic: bool
    compile: bool
    step_memory_mb: int
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


# Nested sections of the round config and the prefix of their keys on the wire.
_SECTIONS = {"model": "model-", "data": "", "dp": "dp-"}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _flatten(value, prefix + _SECTIONS[f.name])
        else:
            nested = isinstance(value, tuple) and value and isinstance(value[0], tuple)
            flat = list(value) if isinstance(value, tuple) else value
            out[_key(prefix, f.name)] = nested_text(value) if nested else flat
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
        values[f.name] = coerce(key, kind, record[key])
    return cls(**values)


def _key(prefix: str, name: str) -> str:
    """``model-`` + ``norm`` -> ``model-norm``; ``model-`` + ``model`` -> ``model``."""
    return kebab(name) if f"{kebab(name)}-" == prefix else prefix + kebab(name)
