"""Before round 1 of a new run, every training site times a few training steps of the run's
network on its own data (``client/step_timing.py``); the coordinator turns the seconds per step
into the training time a round and the run can be expected to take, prints it, and keeps it in
run.json (``expected``). Under record-level DP a step is not timed: a DP step costs more, and
the plan of its steps is the DP session's."""

from __future__ import annotations

import heapq
import logging
import math
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedseg.common.records import CONFIG, SECONDS_PER_STEP, TIME_STEPS
from fedseg.common.round_config import SiteRoundConfig, epoch_steps
from fedseg.server.run_folder import RunFolder

log = logging.getLogger(__name__)


def time_sites(grid: Grid, site_of: dict[int, str], training_sites: list[str], config: SiteRoundConfig,
               timeout: float) -> dict[str, float]:
    """Ask the connected training sites to time a few steps of ``config``'s network.

    Returns:
        site -> seconds per training step, for the sites that answered (a site that refused,
        failed or stayed silent is logged and left out: the estimate never stops a run).
    """
    content = RecordDict({CONFIG: ConfigRecord({**config.to_record(), "server-round": 0, TIME_STEPS: True})})
    nodes = sorted(n for n in set(grid.get_node_ids()) & set(site_of) if site_of[n] in training_sites)
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    seconds: dict[str, float] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        site = site_of.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
        if reply.has_error():
            log.warning("site %s did not time its training steps: %s", site, reply.error.reason)
            continue
        value = reply.content[CONFIG].get(SECONDS_PER_STEP) if CONFIG in reply.content else None
        if isinstance(value, float) and math.isfinite(value) and value > 0:
            seconds[site] = value
        else:  # a broken or hostile reply
            log.warning("site %s answered the step timing with %r: left out of the estimate", site, value)
    return dict(sorted(seconds.items()))


def round_seconds(site_seconds: dict[str, float], at_once: int = 0) -> float:
    """A round's training wall time when each site trains for ``site_seconds``: the slowest site
    where every site has its own machine (``at_once`` 0), else the sites in turns on ``at_once``
    lanes, each next site taking the first lane free (longest first)."""
    if not site_seconds:
        return 0.0
    if at_once <= 0 or at_once >= len(site_seconds):
        return max(site_seconds.values())
    lanes = [0.0] * at_once
    for seconds in sorted(site_seconds.values(), reverse=True):
        heapq.heappush(lanes, heapq.heappop(lanes) + seconds)
    return max(lanes)


def expected_times(step_seconds: dict[str, float], round_steps: dict[str, int], rounds: int,
                   at_once: int = 0) -> dict[str, Any]:
    """run.json's ``expected``: seconds per step, steps and seconds per round at each timed site,
    and the round's and the run's training seconds (``round_seconds``)."""
    steps = {s: round_steps[s] for s in step_seconds if s in round_steps}
    per_site = {s: step_seconds[s] * n for s, n in steps.items()}
    per_round = round_seconds(per_site, at_once)
    return {"seconds_per_step": step_seconds, "steps_per_round": steps, "site_round_seconds": per_site,
            "sites_at_once": at_once, "round_seconds": per_round, "run_seconds": per_round * rounds}


def describe_expected(expected: dict[str, Any], rounds: int, untimed: list[str]) -> str:
    """The line a coordinator reads before round 1."""
    slowest = max(expected["site_round_seconds"], key=expected["site_round_seconds"].get)
    text = (f"expected training time: {duration_text(expected['round_seconds'])} per round, "
            f"{duration_text(expected['run_seconds'])} for {rounds} round(s), plus scoring and messages "
            f"(slowest site {slowest}: {expected['steps_per_round'][slowest]} steps x {expected['seconds_per_step'][slowest]:.2f} s, "
            f"timed on its own data")
    if expected["sites_at_once"]:
        text += f"; {expected['sites_at_once']} site(s) at a time"
    return text + (f"; not timed: {', '.join(untimed)})" if untimed else ")")


def duration_text(seconds: float) -> str:
    """Seconds as a reader wants them: 0.4 s, 25 s, 2.1 min, 1.5 h."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def announce_expected_time(grid: Grid, folder: RunFolder, site_of: dict[int, str], train_cases: dict[str, int],
                           config: SiteRoundConfig, rounds: int, timeout: float, at_once: int = 0) -> None:
    """Time the training sites' steps (``time_sites``), log the expected training time and keep
    it in run.json; ``train_cases``: training site -> its training cases; ``at_once``: sites that
    share this machine's cores at a time (simulation), 0 where each site has its own."""
    step_seconds = time_sites(grid, site_of, sorted(train_cases), config, timeout)
    if not step_seconds:
        log.warning("no site timed its training steps: no expected time for this run")
        return
    steps = {s: epoch_steps(n, config.batch_size, config.local_epochs) for s, n in train_cases.items()}
    expected = expected_times(step_seconds, steps, rounds, at_once)
    log.info("%s", describe_expected(expected, rounds, sorted(set(train_cases) - set(step_seconds))))
    folder.write_run_info({**folder.read_run_info(), "expected": expected})
