"""What the coordinator checks in every site's reply before it counts.

A site is admitted at discovery, but what it sends afterwards may still be broken or hostile: a
NaN that would poison the global model, a tensor of another shape, a claim of more training cases
than it has (which would let it dominate FedAvg's weighted mean), a privacy budget that goes
down, a score outside its range. A reply that fails any check is that site's failure for the
round: the reason goes to the log and to rounds.jsonl, and the global model never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import RecordDict

from fedseg.common.records import ARRAYS, EVAL_PREFIX, METRICS, NUM_EXAMPLES, received_state, weights_problem

# scores that are fractions (Dice, panoptic quality and its parts, AJI, AP; also as ``ensemble-``
# and ``tta-`` scores): [0, 1], or NaN where a label was never scored; every other score (HD95,
# counts) is >= 0 or NaN
UNIT_SCORES = ("dice", "group-dice", "pq", "sq", "rq", "aji", "ap50")


class ReplyRefused(ValueError):
    """A reply failed a check; the message says which and why."""


@dataclass
class DeclaredSite:
    """What a site declared at discovery: its training and validation cases."""

    train: int
    val: int

    @classmethod
    def from_discovery(cls, info: Mapping[str, Any]) -> DeclaredSite:
        """What a site's discovery answer declares."""
        return cls(int(info["num-train"]), int(info["num-val"]))


@dataclass
class ReplyChecks:
    """The checks, against the model the server sends and what each site declared.

    Args:
        model: the shared tensors every training reply must carry (names, shapes, dtypes), as the
            server's initial record holds them (float32).
        declared: site -> its cases, as discovery reported them.
        epsilon: site -> the largest epsilon it has reported (a resume continues from it).
    """

    model: Mapping[str, torch.Tensor]
    declared: dict[str, DeclaredSite]
    epsilon: dict[str, float] = field(default_factory=dict)

    def train_reply(self, site: str, content: RecordDict) -> dict[str, torch.Tensor]:
        """Check a training reply; returns its weights unpacked, in float32.

        Raises:
            ReplyRefused: the first check it fails.
        """
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise ReplyRefused("the reply carries no weights or no metrics")
        try:
            state = received_state(content[ARRAYS])
        except (ValueError, KeyError, TypeError) as err:  # a packed message that breaks its manifest
            raise ReplyRefused(f"its weights cannot be read: {err}") from None
        if (problem := weights_problem(state, self.model)) is not None:
            raise ReplyRefused(problem)
        metrics = dict(content[METRICS])
        scores = {k[len(EVAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(EVAL_PREFIX)}
        own = {k: v for k, v in metrics.items() if not k.startswith(EVAL_PREFIX)}
        bad = sorted(k for k, v in own.items() if not _finite(v))
        if bad:
            raise ReplyRefused(f"metric(s) {', '.join(bad)} not finite")
        _check_count(own, self._declared(site).train, "training")
        if scores:
            check_scores(scores, self._declared(site).val)
        if "epsilon" in own:
            spent = float(own["epsilon"])
            before = self.epsilon.get(site, 0.0)
            if spent < 0 or spent < before:
                raise ReplyRefused(f"epsilon {spent:g} is below the {before:g} it has already spent")
            self.epsilon[site] = spent
        return state

    def evaluate_reply(self, site: str, content: RecordDict) -> None:
        """Check an evaluation reply's scores.

        Raises:
            ReplyRefused: the first check it fails.
        """
        if METRICS not in content.metric_records:
            raise ReplyRefused("the reply carries no scores")
        check_scores(dict(content[METRICS]), self._declared(site).val)

    def _declared(self, site: str) -> DeclaredSite:
        if site not in self.declared:
            raise ReplyRefused("the site was not admitted at discovery")
        return self.declared[site]


def check_scores(scores: Mapping[str, Any], val_cases: int) -> None:
    """Scores in their ranges (NaN: not scored) and no more cases than the site validates on.

    Raises:
        ReplyRefused: the first score out of range.
    """
    for key, value in scores.items():
        if key == NUM_EXAMPLES:
            continue
        value = float(value)
        if math.isnan(value):
            continue
        unit = key.removeprefix("ensemble-").removeprefix("tta-").startswith(UNIT_SCORES)
        if math.isinf(value) or value < 0 or (unit and value > 1):
            raise ReplyRefused(f"score {key} = {value:g} is outside {'[0, 1]' if unit else '[0, inf)'}")
    _check_count(scores, val_cases, "validation", fewest=0)


def _check_count(metrics: Mapping[str, Any], declared: int, kind: str, fewest: int = 1) -> None:
    count = metrics.get(NUM_EXAMPLES)
    if not _finite(count) or float(count) != int(count) or not fewest <= int(count) <= declared:
        raise ReplyRefused(f"{NUM_EXAMPLES} = {count} where the site declared {declared} {kind} case(s) "
                           "at discovery")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
