"""How many patches one forward pass of a training step may hold, under the site's memory budget.

A step's activations (what autograd keeps for the backward pass, and the backward pass's own
buffers) grow with its batch: after the libraries, they are the largest part of a site process's
memory. Where a batch's activations would exceed ``step-memory-mb``, the step runs the batch in
parts and adds their gradients, each part's loss weighted by its share of the batch: the same
gradient as the whole batch at once (for losses that are a mean over patches, and norm layers that
see one patch at a time), with a fraction of the memory. The activations of one patch are measured
once per network, patch shape and precision in this process, by counting what autograd keeps in
one forward pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)
_measured: dict[tuple, int] = {}


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd keeps for the backward pass of ``forward()``'s loss (each tensor storage
    counted once); the graph is freed before this returns."""
    kept: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # held until counted, so that freed memory is not counted twice

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.nbytes() and not (isinstance(tensor, nn.Parameter) or tensor.is_leaf and tensor.requires_grad):
            kept[storage.data_ptr()] = storage.nbytes()
        alive.append(tensor)
        return tensor

    with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    alive.clear()
    return sum(kept.values())


def patches_per_pass(budget_mb: int, batch: int, per_patch_bytes: int) -> int:
    """Patches one forward pass may hold: the whole ``batch`` where it fits ``budget_mb`` MiB (0:
    no budget), else as many as fit, at least one."""
    if budget_mb <= 0 or per_patch_bytes <= 0:
        return batch
    return max(1, min(batch, budget_mb * 2**20 // per_patch_bytes))


def balanced_parts(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` in the fewest parts of at most ``size``, as even as possible (a compiled network
    then sees at most two batch sizes)."""
    parts = math.ceil(len(items) / max(1, size))
    step, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + step + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def per_patch_bytes(key: tuple, forward_one: Callable[[], torch.Tensor], site: str, batch: int,
                    budget_mb: int) -> int:
    """The activations of one patch for this ``key`` (network, patch shape, precision), measured
    by ``forward_one`` the first time this process sees it; says once how the batch is split."""
    if key not in _measured:
        _measured[key] = saved_bytes(forward_one)
        part = patches_per_pass(budget_mb, batch, _measured[key])
        if part < batch:
            log.info("site %s: a training step keeps %.0f MiB of activations per patch; its batch of %d trains "
                     "%d patch(es) per pass, within step-memory-mb %d (the same gradient, in parts)",
                     site, _measured[key] / 2**20, batch, part, budget_mb)
    return _measured[key]
