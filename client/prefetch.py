"""The next training batch prepared while the current one trains.

Cropping and augmenting patches is CPU work the training step waits for; one background thread
draws the next batch's patches while the step runs (on a GPU, or in PyTorch's kernels, which
release the GIL). One producer draws the batches in order, so the random patches are exactly
those of an unthreaded loop: a seeded run gives the same model either way. Threads rather than
DataLoader worker processes: a worker process would draw from its own random stream (another
model for the same seed) and would hold a copy of the site's decoded cases.

It helps where a core is free for it: on a CUDA device, or when PyTorch computes on fewer threads
than this process may use (a simulated site gets one CPU). Where PyTorch's own threads take every
core it slows the step, so it is off there. Tiny batches are not worth a thread: the two threads
then wait on each other for Python's interpreter lock, so batches under ``MIN_VOXELS`` are
prepared in the loop (benchmarks/RESULTS.md, prefetch).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_DONE = object()
MIN_VOXELS = 32**3  # per batch: measured slower at 2 x 16^2, faster at 4 x 128^2 and 8 x 32^3


def ahead_depth(device: str, voxels: int | None = None) -> int:
    """Batches to prepare ahead on ``device``: 1 where a core is free for it, else 0; also 0 for
    batches of fewer than ``MIN_VOXELS`` voxels (pixels), when ``voxels`` per batch is given."""
    free_core = torch.get_num_threads() < len(os.sched_getaffinity(0))
    worth_it = voxels is None or voxels >= MIN_VOXELS
    return 1 if (device.startswith("cuda") or free_core) and worth_it else 0


def prefetched(batches: Iterable[T], prepare: Callable[[T], Any], depth: int = 1) -> Iterator[Any]:
    """``prepare(b)`` for each ``b`` of ``batches`` in order, up to ``depth`` batches ahead in a
    background thread (``depth`` 0: in the caller's thread). An error preparing a batch is raised
    where that batch is consumed; stopping early stops the thread."""
    if depth <= 0:
        yield from (prepare(b) for b in batches)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                ready.put((True, prepare(batch)))  # a consumer that stopped drains the queue
                if stop.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            ready.put((False, err))
            return
        ready.put((True, _DONE))

    thread = threading.Thread(target=produce, name="fedseg-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = ready.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
