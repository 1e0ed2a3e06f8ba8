"""Model <-> ArrayRecord and metrics <-> MetricRecord: the only shapes that cross the wire."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"
EVAL_PREFIX = "eval/"  # a train reply's scores of the model it received, before training on it
PACKED = "packed/"  # ``packed_record``: one flat array per dtype + a manifest of names and shapes
MANIFEST = PACKED + "manifest"
TIME_STEPS = "time-steps"  # a discovery question: time a few training steps of the round config's network
SECONDS_PER_STEP = "seconds-per-step"  # its answer
SITE_ERROR = 3100  # the Flower error code of a site that refuses a message with a clear reason


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
    """Torch state dict of a received record, packed or not, floating-point tensors in float32
    (whatever precision they travelled in: aggregation and training always compute in float32)."""
    state = ({k: torch.from_numpy(v) for k, v in _unpacked(record).items()} if is_packed(record)
             else record.to_torch_state_dict())
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is a ``packed_record``."""
    return MANIFEST in record


def packed_record(record: ArrayRecord) -> ArrayRecord:
    """The same tensors as one flat array per dtype plus a JSON manifest (name, dtype, shape, in
    order). Flower moves every Array as objects of their own, each a signed request with its own
    headers, so a U-Net of 55 tensors becomes 3 arrays on the wire; values are unchanged."""
    flat: dict[str, list[np.ndarray]] = {}
    manifest = []
    for name, array in record.items():
        values = array.numpy()
        flat.setdefault(values.dtype.name, []).append(values.ravel())
        manifest.append([name, values.dtype.name, list(values.shape)])
    out = {PACKED + dtype: Array(np.concatenate(parts)) for dtype, parts in flat.items()}
    out[MANIFEST] = Array(np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8))
    return ArrayRecord(out)


def unpacked_record(record: ArrayRecord) -> ArrayRecord:
    """Inverse of ``packed_record``; a record that is not packed is returned as it is."""
    if not is_packed(record):
        return record
    return ArrayRecord({k: Array(v) for k, v in _unpacked(record).items()})


def _unpacked(record: ArrayRecord) -> dict[str, np.ndarray]:
    manifest = json.loads(record[MANIFEST].numpy().tobytes())
    flat = {k[len(PACKED):]: record[k].numpy() for k in record if k != MANIFEST}
    used = dict.fromkeys(flat, 0)
    out = {}
    for name, dtype, shape in manifest:
        size = math.prod(shape)
        if dtype not in flat or used[dtype] + size > flat[dtype].size:
            raise ValueError(f"packed weights do not match their manifest at {name!r}")
        out[name] = flat[dtype][used[dtype]:used[dtype] + size].reshape(shape).copy()
        used[dtype] += size
    if any(used[dtype] != flat[dtype].size for dtype in flat):
        raise ValueError("packed weights hold more values than their manifest names")
    return out


def weights_problem(state: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor],
                    optional: Collection[str] = (), ignored: Collection[str] = ()) -> str | None:
    """Why ``state`` is not ``model``'s tensors, or None: names missing or unknown (``optional``
    names may be missing, ``ignored`` ones are not checked), another shape or dtype, a value
    that is not finite. Both ends check the weights they receive with it."""
    missing = sorted(set(model) - set(state) - set(optional))
    unknown = sorted(set(state) - set(model) - set(ignored))
    if missing or unknown:
        return f"{len(missing)} tensor(s) missing {missing[:3]}, {len(unknown)} unknown {unknown[:3]}"
    for name, got in state.items():
        if name not in model:
            continue
        want = model[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"tensor {name!r} is {got.dtype} {tuple(got.shape)}, the model's is {want.dtype} {tuple(want.shape)}"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"tensor {name!r} holds {int((~torch.isfinite(got)).sum())} non-finite value(s)"
    return None


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

