"""Two fixes to Flower 1.42's simulation engine, applied only while ``simulate`` runs it.

Flower's message pump (``vce_api.add_messages_to_queue``) asks every virtual node's inbox in turn
every 0.1 s, and each ask scans every stored message from the start
(``InMemoryLinkState.get_message_ins``): sites x messages checks per poll, under the state's lock.
At 1,000 sites that is ~500,000 checks per poll while a round's messages are out, seconds of
CPU that the sites' own training waits for. ``add_messages_to_queue`` below hands out the same
messages in the same order, at most one per node per poll as Flower's does, with one pass over
the stored messages.

Both the pump and the ServerApp's grid (``InMemoryGrid.pull_interval``) wait 0.1 s between polls,
so every round paid up to 0.2 s of waiting on top of its training; here both poll every
``POLL_S``, or less often
where a poll itself takes long (thousands of sites).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Iterable, Iterator
from queue import Queue
from typing import Any

import flwr
from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.superlink.grid import InMemoryGrid
from flwr.supercore.date import now

FIXED_FOR = "1.42."  # the Flower release whose internals this relies on (pyproject pins it)
_FLOWERS_PUMP = vce_api.add_messages_to_queue
_RUN_SIMULATION = importlib.import_module("flwr.simulation.run_simulation")  # the module, not the function
POLL_S = 0.02  # seconds between polls (Flower's: 0.1) ...
POLL_SHARE = 0.1  # ... or longer: a poll's own time is at most this share of the time between polls


def _wait_after(seconds_polling: float) -> float:
    """Seconds until the next poll: ``POLL_S``, or longer where a poll itself is slow (each scans
    every message of the round: at 10,000 sites, polls every 0.02 s took much of the server's CPU)."""
    return max(POLL_S, seconds_polling / POLL_SHARE)


class PromptGrid(InMemoryGrid):
    """Flower's in-memory grid, pulling the sites' replies every ``POLL_S`` (or ``_wait_after``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"pull_interval": POLL_S, **kwargs})

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        started = time.monotonic()
        replies = super().pull_messages(message_ids)
        self.pull_interval = _wait_after(time.monotonic() - started)
        return replies


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict[int, int],
                          f_stop: threading.Event) -> None:
    """Flower's pump, one pass per poll: every undelivered message to a simulated node, at most
    one per node, checked (expiry, federation) and marked delivered as ``get_message_ins`` does."""
    if not isinstance(state, InMemoryLinkState):  # another state keeps its messages elsewhere
        _FLOWERS_PUMP(state, queue, nodes_mapping, f_stop)
        return
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        taken: set[int] = set()
        started = time.monotonic()
        with state.lock:
            for message_id, message in list(state.message_ins_store.items()):
                node = message.metadata.dst_node_id
                if message.metadata.delivered_at or node not in nodes or node in taken:
                    continue
                state._check_stored_messages({message_id})  # drops it if expired or out of federation
                if message_id in state.message_ins_store:
                    message.metadata.delivered_at = now().isoformat()
                    taken.add(node)
                    queue.put(message)
        f_stop.wait(_wait_after(time.monotonic() - started))


@contextlib.contextmanager
def prompt_engine() -> Iterator[None]:
    """Run Flower's simulation with the one-pass pump and ``PromptGrid`` (Flower's own elsewhere)."""
    if not flwr.__version__.startswith(FIXED_FOR) or not hasattr(InMemoryLinkState, "_check_stored_messages"):
        yield
        return
    vce_api.add_messages_to_queue, _RUN_SIMULATION.InMemoryGrid = add_messages_to_queue, PromptGrid
    try:
        yield
    finally:
        vce_api.add_messages_to_queue, _RUN_SIMULATION.InMemoryGrid = _FLOWERS_PUMP, InMemoryGrid
