"""Model <-> ArrayRecord and metrics <-> MetricRecord: the only shapes that cross the wire."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, MetricRecord

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
EVAL_PREFIX = "eval/"  # a train reply's scores of the model it received (evaluate-in-train)


class PrivacyBoundaryError(RuntimeError):
    """Something that must stay at the site was about to be sent."""


def shared_record(state: Mapping[str, torch.Tensor], local: set[str], dtype: str = "float32") -> ArrayRecord:
    """ArrayRecord of the shared tensors only, floating-point ones sent as ``dtype``
    (``transfer-dtype``; the receiver computes in float32 again).

    Raises:
        PrivacyBoundaryError: if ``state`` holds a site-local key.
    """
    leaked = sorted(set(state) & local)
    if leaked:
        raise PrivacyBoundaryError(f"refusing to send site-local tensors: {leaked[:5]}")
    return wire_record({k: v.detach().cpu() for k, v in state.items()}, dtype)


def wire_record(state: Mapping[str, torch.Tensor], dtype: str) -> ArrayRecord:
    """ArrayRecord with every floating-point tensor cast to ``dtype`` (integers as they are)."""
    cast = getattr(torch, dtype)
    return ArrayRecord({k: v.to(cast) if v.is_floating_point() else v for k, v in state.items()})


def received_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Torch state dict of a received record, floating-point tensors in float32 (whatever
    precision they travelled in: aggregation and training always compute in float32)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in record.to_torch_state_dict().items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialized payload bytes of an ArrayRecord (what the transport carries for it)."""
    return sum(len(array.data) for array in record.values())


def scalar_metrics(values: Mapping[str, float | int]) -> MetricRecord:
    """MetricRecord of scalars; refuses anything that is not a single number."""
    out: dict[str, float | int] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PrivacyBoundaryError(f"metric {key!r} is not a scalar number")
        out[key] = value
    return MetricRecord(out)

