"""Per-round bookkeeping: what each site reported (RoundRecorder) and what the coordinator does
when a round ends (RoundLog: checkpoint, rounds.jsonl line, progress line)."""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict

from fedseg.common.records import ARRAYS, METRICS, record_bytes
from fedseg.server.checkpoints import save_checkpoint
from fedseg.server.run_folder import RunFolder
from fedseg.server.tracking import RoundTracking

log = logging.getLogger(__name__)


TIMING_PREFIX = "seconds-"  # a site's timing of its work (seconds-train, ...): kept apart from its scores


def without_timings(metrics: dict[str, Any]) -> dict[str, Any]:
    """A site's metrics without its ``seconds-`` timings (what a seeded run repeats exactly)."""
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING_PREFIX)}


def _empty_round() -> dict[str, Any]:
    return {"train": {}, "eval": {}, "errors": {}, "bytes-down": {}, "time": {}}


class RoundRecorder:
    """Collects what each site reported in a round: scalars, payload bytes, errors."""

    def __init__(self) -> None:
        self._rounds: dict[int, dict[str, Any]] = defaultdict(_empty_round)

    def sent(self, server_round: int, site: str, content: RecordDict) -> None:
        """Record the shared-weights payload sent to a site."""
        if ARRAYS in content.array_records:
            self._rounds[server_round]["bytes-down"][site] = record_bytes(content[ARRAYS])

    def trained(self, server_round: int, replies: list[tuple[str, Message]]) -> None:
        """Record training replies: loss, cases, steps and bytes sent up, or the site's error."""
        for site, msg in replies:
            if msg.has_error():
                self._rounds[server_round]["errors"][site] = msg.error.reason
                continue
            entry = self._untimed(server_round, site, dict(msg.content[METRICS]))
            entry["bytes-up"] = record_bytes(msg.content[ARRAYS])
            self._rounds[server_round]["train"][site] = entry
        record = self._rounds[server_round]
        for site in set(record["bytes-down"]) - set(record["train"]) - set(record["errors"]):
            record["errors"][site] = "no reply within round-timeout (site dropped out?)"

    def failed(self, server_round: int, site: str, reason: str) -> None:
        """Record a site's failure the coordinator found (a reply it refused)."""
        self._rounds[server_round]["errors"][site] = reason

    def evaluated(self, server_round: int, replies: list[tuple[str, Message]]) -> None:
        """Record each site's validation scores (or its error)."""
        for site, msg in replies:
            if msg.has_error():
                self._rounds[server_round]["errors"][f"{site}/eval"] = msg.error.reason
            else:
                self.scored(server_round, site, dict(msg.content[METRICS]))

    def scored(self, server_round: int, site: str, scores: dict[str, Any]) -> None:
        """Record one site's validation scores of the round's model (from an evaluation reply,
        or from the next round's train reply)."""
        self._rounds[server_round]["eval"][site] = self._untimed(server_round, site, scores)

    def _untimed(self, server_round: int, site: str, metrics: dict[str, Any]) -> dict[str, Any]:
        """``metrics`` without the site's timings, which go to the round's ``time`` part
        (``seconds-train`` -> ``time[site]["train"]``): scores and losses stay what a seeded run
        repeats exactly."""
        timed = {k.removeprefix(TIMING_PREFIX): v for k, v in metrics.items() if k.startswith(TIMING_PREFIX)}
        if timed:
            self._rounds[server_round]["time"].setdefault(site, {}).update(timed)
        return without_timings(metrics)

    def note(self, server_round: int, key: str, value: Any) -> None:
        """Attach a server-side figure to the round (e.g. client-level epsilon)."""
        self._rounds[server_round][key] = value

    def peek(self, server_round: int) -> dict[str, Any]:
        """A copy of what the round has recorded so far (what a checkpoint keeps of a round
        whose scores are still to come)."""
        return copy.deepcopy(self._rounds[server_round])

    def restore(self, server_round: int, record: dict[str, Any]) -> None:
        """Continue a round from a checkpoint's ``peek`` (a resume completes its line)."""
        self._rounds[server_round] = {**_empty_round(), **copy.deepcopy(record)}

    def pop(self, server_round: int) -> dict[str, Any]:
        """The finished round's record (removed from the recorder)."""
        return {"round": server_round, **self._rounds.pop(server_round, _empty_round())}


class RoundLog:
    """The round-end hooks: checkpoint the global model, append the round to rounds.jsonl, log it.

    A round scored inside the next round's train messages is checkpointed when its training ends
    (``trained``), with what it recorded so far, and logged when its scores arrive (``ended``);
    any other round does both when its evaluation ends.

    Args:
        folder: the run folder.
        recorder: where the strategy collected the round's replies.
        checkpoint_meta: what rebuilds the model beside the weights (see ``checkpoints``).
        total_rounds: the run's planned rounds (for the progress line).
        checkpointed: a round already checkpointed whose line is still to come (resume).
        tracking: where each line also goes (``tracking.RoundTracking``; None: nowhere else).
    """

    def __init__(self, folder: RunFolder, recorder: RoundRecorder, checkpoint_meta: dict[str, Any],
                 total_rounds: int, checkpointed: int = 0, tracking: RoundTracking | None = None) -> None:
        self.folder, self.recorder, self.meta, self.tracking = folder, recorder, checkpoint_meta, tracking
        self.total_rounds = total_rounds
        self.checkpointed = checkpointed
        self._mark = time.monotonic()  # when the last round ended (its training, if scored later)

    def trained(self, server_round: int, aggregate: ArrayRecord, evaluated: ArrayRecord,
                server_state: dict[str, Any] | None = None) -> None:
        """Checkpoint a round whose scores come with the next round's training replies."""
        now = time.monotonic()
        seconds, self._mark = round(now - self._mark, 3), now
        self.recorder.note(server_round, "seconds", seconds)
        save_checkpoint(self.folder.dir, server_round, aggregate, self.meta,
                        average=None if evaluated is aggregate else evaluated, server_state=server_state,
                        pending_record=self.recorder.peek(server_round))
        self.recorder.note(server_round, "seconds-checkpoint", round(time.monotonic() - now, 3))
        first = not self.checkpointed
        self.checkpointed = server_round
        log.info("round %d/%d trained in %.1fs (checkpoint saved)%s", server_round, self.total_rounds, seconds,
                 f"; its validation scores come with round {server_round + 1}'s training replies, "
                 "and so on each round" if first else "")

    def ended(self, server_round: int, aggregate: ArrayRecord | None, evaluated: ArrayRecord | None,
              server_state: dict[str, Any] | None = None) -> None:
        """Checkpoint the round (unless ``trained`` did) and append its rounds.jsonl line."""
        record = self.recorder.pop(server_round)
        if "seconds" not in record:  # else timed when its training ended (``trained``)
            now = time.monotonic()
            record["seconds"], self._mark = round(now - self._mark, 3), now
        if server_round != self.checkpointed:
            if aggregate is None or evaluated is None:
                raise ValueError(f"round {server_round} has no checkpoint yet: its weights are needed")
            started = time.monotonic()
            save_checkpoint(self.folder.dir, server_round, aggregate, self.meta,
                            average=None if evaluated is aggregate else evaluated, server_state=server_state)
            record["seconds-checkpoint"] = round(time.monotonic() - started, 3)
        self.folder.append_round(record)
        log_round(record, self.total_rounds)
        if self.tracking is not None:
            self.tracking.log(record)


def log_round(record: dict[str, Any], total: int) -> None:
    """One progress line per round: per-site loss, validation Dice (AJI), epsilon; then errors."""
    loss = ", ".join(f"{s} {m['train-loss']:.3f}" for s, m in record["train"].items())
    dice = ", ".join(f"{s} {_num(m.get('dice'))}" for s, m in record["eval"].items())
    aji = ", ".join(f"{s} {m['aji']:.3f}" for s, m in record["eval"].items() if m.get("aji") is not None)
    eps = ", ".join(f"{s} {m['epsilon']:.2f}" for s, m in record["train"].items() if "epsilon" in m)
    log.info("round %d/%d done in %.1fs | train loss: %s | val dice: %s%s%s", record["round"], total,
             record["seconds"], loss or "-", dice or "-", f" | val AJI: {aji}" if aji else "",
             f" | epsilon: {eps}" if eps else "")
    for site, reason in record["errors"].items():
        log.warning("round %d: site %s: %s", record["round"], site, reason)


def _num(value: float | None) -> str:
    return "nan" if value is None else f"{value:.3f}"
