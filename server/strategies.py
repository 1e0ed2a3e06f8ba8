"""Flower's own strategies by name (FedAvg, FedProx, FedAdam, FedMedian, trimmed mean, and Flower's
client-level DP wrapper), and the state they carry from round to round."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg,
                                     FedMedian, FedProx, FedTrimmedAvg, Strategy)

from fedseg.common.config import ConfigError, RunConfig

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "trimmed-mean": FedTrimmedAvg,
}


def build_strategy(cfg: RunConfig, num_training_sites: int) -> Strategy:
    """The configured Flower strategy (``strategy``, ``fraction-train``, ``min-train-sites``,
    ``proximal-mu``, ``server-lr``, ``trim-fraction``; ``dp=client`` wraps it in Flower's
    client-side fixed clipping, whose server adds the noise and accounts epsilon).

    Raises:
        ConfigError: a trimmed mean that would cut no site.
    """
    base = BASES[cfg.strategy]
    kwargs: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=cfg.min_train_sites, min_evaluate_nodes=cfg.min_train_sites,
        min_available_nodes=cfg.min_train_sites,
    )
    if base is FedProx:
        kwargs["proximal_mu"] = cfg.proximal_mu
    if base is FedAdam:
        kwargs["eta"] = cfg.server_lr
    if base is FedTrimmedAvg:
        if int(cfg.trim_fraction * num_training_sites) == 0:
            raise ConfigError(f"run-config 'trim-fraction' = {cfg.trim_fraction:g} cuts no site with "
                              f"{num_training_sites} training sites (it cuts floor(fraction x sites) from "
                              f"each end): use at least {1 / num_training_sites:.3g}, or strategy=fedmedian")
        kwargs["beta"] = cfg.trim_fraction
    strategy = base(**kwargs)
    if cfg.dp != "client":
        return strategy
    sampled = max(int(num_training_sites * cfg.fraction_train), cfg.min_train_sites)
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=cfg.dp_delta, population_size=num_training_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=cfg.dp_noise_multiplier,
        clipping_norm=cfg.dp_max_grad_norm if cfg.dp_max_grad_norm > 0 else 1.0,
        num_sampled_clients=sampled, accountant=accountant)


def samples_sites(strategy: Strategy) -> bool:
    """Whether the strategy (or the one a Flower wrapper holds) trains only some sites a round."""
    inner = getattr(strategy, "strategy", strategy)
    return float(getattr(inner, "fraction_train", 1.0)) < 1.0


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """What a Flower strategy carries from round to round beyond the weights: FedOpt's moments
    (FedAdam's m_t, v_t) and Flower's client-level privacy accountant."""
    state: dict[str, Any] = {}
    for name in ("m_t", "v_t"):
        if (moments := getattr(strategy, name, None)) is not None:
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in moments.items()}
    if (accountant := getattr(strategy, "accountant", None)) is not None:
        state["accountant"] = accountant.state_dict()
    return state


def restore_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Inverse of ``strategy_state``."""
    for name in ("m_t", "v_t"):
        if name in state:
            setattr(strategy, name, {k: v.numpy() for k, v in state[name].items()})
    if "accountant" in state:
        strategy.accountant.load_state_dict(state["accountant"])  # type: ignore[attr-defined]


def client_level_privacy(strategy: Strategy) -> dict[str, float] | None:
    """Epsilon/delta spent so far by Flower's client-level accountant (``dp=client``), else None."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    return None if spent is None else {"epsilon": spent.epsilon, "delta": spent.delta,
                                       "releases": spent.num_releases}
