"""The learning-rate schedule over a federated run (``lr-schedule``): the same for the sites, the
pooled and local baselines, and the DP learning rate."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def round_lr(lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """``lr`` in round ``server_round`` (1-based) of ``num_rounds``: constant, or cosine-decayed
    from ``lr`` towards 0 (round r trains at lr x (1 + cos(pi (r - 1) / R)) / 2)."""
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * (server_round - 1) / max(num_rounds, 1))) / 2
    return lr
