"""Model <-> ArrayRecord and metrics <-> MetricRecord: the only shapes that cross the wire."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, MetricRecord

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"


class PrivacyBoundaryError(RuntimeError):
    """Something that must stay at the site was about to be sent."""


def shared_record(state: Mapping[str, torch.Tensor], local: set[str]) -> ArrayRecord:
    """ArrayRecord of the shared tensors only.

    Raises:
        PrivacyBoundaryError: if ``state`` holds a site-local key.
    """
    leaked = sorted(set(state) & local)
    if leaked:
        raise PrivacyBoundaryError(f"refusing to send site-local tensors: {leaked[:5]}")
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def to_state(record: ArrayRecord, keep: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Torch state dict from an ArrayRecord, optionally only the ``keep`` keys."""
    state = record.to_torch_state_dict()
    return {k: v for k, v in state.items() if keep is None or k in keep}


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

