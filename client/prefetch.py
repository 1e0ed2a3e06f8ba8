"""The next training batch prepared while the current one trains.

Cropping and augmenting patches is CPU work the training step waits for; one background thread
draws the next batch's patches while the step runs (on a GPU, or in PyTorch's kernels, which
release the GIL). One producer draws the batches in order, so the random patches are exactly
those of an unthreaded loop: a seeded run gives the same model either way. Threads rather than
DataLoader worker processes: a worker process would draw from its own random stream (another
model for the same seed) and would hold a copy of the site's decoded cases.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


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
                item = (True, prepare(batch))
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
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
