"""``SiteStrategy``: the round's whole life at the coordinator, wrapped around a Flower strategy.

The inner strategy (FedAvg, FedProx, ..., or Flower's client-level DP wrapper) samples sites and
aggregates; ``SiteStrategy`` owns everything fedseg adds around it, as Flower's own DP wrappers
wrap a strategy:

- only sites checked at discovery are ever sampled (a site of the run that connects later, say
  back from a restart while the coordinator resumed, is asked first: ``discovery.LateSites``);
  held-out sites never train but score every scored round (with the unseen-site norm set, and with
  ``heldout-ensemble`` K the K - 1 earlier models), and score after test-time adaptation in the
  last round (every round with ``heldout-adapt=every``);
- a round is scored every ``evaluate-every`` rounds and always the last one; the rounds between
  are trained, checkpointed and logged without scores;
- every reply is checked before it counts (``reply_checks``): one that fails is that site's
  failure for the round, never part of the global model;
- replies are aggregated in a fixed site order (a seeded run is bit-for-bit repeatable), in
  float32 tensor by tensor whatever form they travelled in; too few sites stop the run clearly;
- weights travel packed (one flat array per dtype) in ``transfer-dtype``;
- training sites score round r's model inside round r + 1's train message (one message per site
  and round) wherever every site trains the model it scores, and held-out sites score it in
  evaluation messages sent beside those train messages, last, so they take the cores that
  training sites of unequal size leave idle at the round's end; the last round, a run that
  samples sites and a run whose server keeps a moving average are scored by evaluation messages
  after training;
- every round is checkpointed and written to rounds.jsonl (``rounds.RoundLog``) with what each
  site reported (``rounds.RoundRecorder``); a resumed run continues exactly, its round numbers
  counted on from the checkpoint.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedseg.common.config import TRANSFER_DTYPES
from fedseg.common.models import UNSEEN_PREFIX, with_ensemble
from fedseg.common.records import (ARRAYS, CONFIG, EVAL_PREFIX, METRICS, packed_record, received_state,
                                   wire_record)
from fedseg.server.discovery import LateSites
from fedseg.server.model_average import ModelAverage
from fedseg.server.reply_checks import DeclaredSite, ReplyChecks, ReplyRefused
from fedseg.server.rounds import RoundLog, RoundRecorder
from fedseg.server.run_folder import RunFolder
from fedseg.server.strategies import client_level_privacy, restore_strategy_state, samples_sites, strategy_state
from fedseg.server.tracking import RoundTracking

log = logging.getLogger(__name__)


class TooFewSitesError(RuntimeError):
    """A round ended with fewer successful training sites than ``min-train-sites``."""


class _SiteView:
    """View of a Grid that lists only nodes checked at discovery, minus ``hidden`` ones: a node
    that connects later (not data-checked, shape unknown) is never sampled."""

    def __init__(self, grid: Grid, known: dict[int, str], hidden: set[int]) -> None:
        self._grid, self._known, self._hidden = grid, known, hidden

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n in self._known and n not in self._hidden]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SiteStrategy(Strategy):
    """A Flower strategy with fedseg's round life around it (see the module docstring).

    Args:
        inner: the Flower strategy that samples and aggregates (``strategies.build_strategy``).
        site_of: node id -> site name, from discovery; at least one site.
        reply_checks: what every reply must pass (the model sent, the cases sites declared).
        folder: the run folder (checkpoints, rounds.jsonl).
        checkpoint_meta: what rebuilds the model beside the weights (``checkpoints.META_KEYS``).
        num_rounds: the run's planned rounds, >= 1.
        heldout_nodes: node ids that only evaluate, a subset of ``site_of``.
        min_sites: fewest training sites a round needs, >= 1.
        round_timeout: seconds to wait for sites and replies, > 0.
        average: the server's moving average of the global model (None: none).
        ensemble_size: K >= 2 also sends held-out sites the K - 1 earlier rounds' models; 0: off.
        transfer_dtype: precision of the weights on the wire, one of ``TRANSFER_DTYPES``.
        pretrained_start: round 1's training sites also receive the unseen-site norm set (the
            pretrained model's norms), so their local layers start from them.
        done: rounds already completed (a resume), >= 0.
        server_state: ``state()`` at the checkpoint a resume continues from.
        pending_record: what the checkpoint's round recorded before a crash cut it off from the
            scores it awaited: the resumed run completes its rounds.jsonl line.
        late_sites: admits the run's sites that connect after discovery (None: none are).
        tracking: where each round's line also goes (TensorBoard, MLflow; None: nowhere else).
        evaluate_every: K >= 1: rounds K, 2K, ... and the last are scored.
        adapt_every_round: held-out sites adapt and score again in every scored round, not only
            the last.
        on_final_model: called with the final model (what the last round scores) before the sites
            are asked to score it (None: nothing is).

    Raises:
        ValueError: an argument out of range, naming it.
    """

    def __init__(self, inner: Strategy, site_of: dict[int, str], *, reply_checks: ReplyChecks, folder: RunFolder,
                 checkpoint_meta: dict[str, Any], num_rounds: int, heldout_nodes: set[int] | None = None,
                 min_sites: int = 1, round_timeout: float = 3600.0, average: ModelAverage | None = None,
                 ensemble_size: int = 0, transfer_dtype: str = "float32", pretrained_start: bool = False,
                 done: int = 0, server_state: dict[str, Any] | None = None,
                 pending_record: dict[str, Any] | None = None, late_sites: LateSites | None = None,
                 tracking: RoundTracking | None = None, evaluate_every: int = 1,
                 adapt_every_round: bool = False,
                 on_final_model: Callable[[ArrayRecord], None] | None = None) -> None:
        heldout = set(heldout_nodes or ())
        checks = [
            ("inner", isinstance(inner, Strategy), "must be a Flower Strategy"),
            ("site_of", bool(site_of), "must name at least one site"),
            ("heldout_nodes", heldout <= set(site_of), "must be nodes of site_of"),
            ("num_rounds", num_rounds >= 1, "must be >= 1"),
            ("min_sites", min_sites >= 1, "must be >= 1"),
            ("round_timeout", round_timeout > 0, "must be > 0"),
            ("ensemble_size", ensemble_size == 0 or ensemble_size >= 2, "must be 0 or >= 2"),
            ("transfer_dtype", transfer_dtype in TRANSFER_DTYPES, f"must be one of {TRANSFER_DTYPES}"),
            ("done", done >= 0, "must be >= 0"),
            ("evaluate_every", evaluate_every >= 1, "must be >= 1"),
            ("pending_record", pending_record is None or done >= 1, "needs a completed round (done >= 1)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SiteStrategy: {name} {why}")
        self.inner, self.site_of, self.heldout_nodes = inner, dict(site_of), heldout
        self.checks, self.late_sites = reply_checks, late_sites
        self.num_rounds, self.done = num_rounds, done
        self.min_sites, self.round_timeout = min_sites, round_timeout
        self.average = average or ModelAverage(0.0)
        self.ensemble_size = ensemble_size if heldout or (late_sites and late_sites.heldout_sites) else 0
        self.transfer_dtype, self.pretrained_start = transfer_dtype, pretrained_start
        self.evaluate_every, self.adapt_every_round = evaluate_every, adapt_every_round
        self.on_final_model = on_final_model
        # a moving average is not the model sites train on, and sites left out of a round would not
        # score the last one: both are scored in evaluation messages
        self.evaluate_in_train = self.average.decay == 0 and not samples_sites(inner)
        self.recorder = RoundRecorder()
        self.round_log = RoundLog(folder, self.recorder, checkpoint_meta, num_rounds,
                                  checkpointed=done if pending_record is not None else 0, tracking=tracking)
        self._pending: int | None = None  # a trained round whose scores come with the next replies
        if pending_record is not None:
            self.recorder.restore(done, pending_record)
            self._pending = done
        self._recent: list[ArrayRecord] = []  # the last K rounds' models, the one being scored last
        self._aggregate: ArrayRecord | None = None  # the round's aggregate (what training goes on from)
        self._wired: tuple[ArrayRecord, ArrayRecord] | None = None  # weights, their training-site form
        if server_state:
            self._restore(server_state)

    # -- the run ---------------------------------------------------------------------------------

    def run(self, grid: Grid, initial: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """The rounds still to do with Flower's round loop (``Strategy.start``).

        Returns:
            The final global weights (the server's moving average where it keeps one).
        """
        remaining = self.num_rounds - self.done
        if remaining <= 0:
            if self._pending is not None:
                log.warning("round %d has no validation scores: they would have come with round %d",
                            self._pending, self._pending + 1)
                self._end_round(self._pending, initial, initial)
            return initial
        result = self.start(grid=grid, initial_arrays=initial, num_rounds=remaining,
                            timeout=self.round_timeout, train_config=config, evaluate_config=config)
        return self.average.model(result.arrays if len(result.arrays) else initial)

    def state(self) -> dict[str, Any]:
        """What the run carries from round to round beyond the weights: the inner strategy's
        state (``strategies.strategy_state``), the held-out ensemble's members and the sampler's
        random state (Flower samples sites with ``random``)."""
        state: dict[str, Any] = {"random": random.getstate(), "epsilon": dict(self.checks.epsilon),
                                 **strategy_state(self.inner)}
        if self._recent:
            state["recent"] = [m.to_torch_state_dict() for m in self._recent]
        return state

    # -- Flower's hooks ---------------------------------------------------------------------------

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.done
        view = _SiteView(grid, self.site_of, self.heldout_nodes)
        self._admit_late(grid)
        self._wait_for_sites(grid, view, rnd)
        config["evaluate-in-train"] = self._pending is not None  # score the model you receive first
        scoring = self._heldout_messages(arrays, config, grid) if self._pending is not None else []
        sampled = self.inner.configure_train(rnd, arrays, config, view)
        messages = [self._to_training_site(m, keep_norms=self.pretrained_start and rnd == 1) for m in sampled]
        for m in messages:
            self.recorder.sent(rnd, self.site_of[m.metadata.dst_node_id], m.content)
        return messages + scoring

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.done
        replies = self._ordered(replies)
        scoring = [m for m in replies if m.metadata.src_node_id in self.heldout_nodes]
        if scoring:  # held-out sites' scores of the last round's model, sent beside this round's training
            self._record_scores(rnd - 1, scoring)
        training = [m for m in replies if m.metadata.src_node_id not in self.heldout_nodes]
        replies, states = self._passing(rnd, training, self.checks.train_reply)
        for m in replies:
            if not m.has_error() and (scores := _take_scores(m)):  # last round's model, scored first
                self.recorder.scored(rnd - 1, reply_site(self.site_of, m), scores)
        self.recorder.trained(rnd, self._named(replies))  # the bytes as they travelled
        for m in replies:
            if id(m) in states:  # in float32, tensor by tensor
                m.content[ARRAYS] = ArrayRecord(states[id(m)])
        ok = [m for m in replies if not m.has_error()]
        if len(ok) < self.min_sites:
            errors = sorted(self.recorder.peek(rnd)["errors"].items())
            failures = "; ".join(f"{site}: {why}" for site, why in errors)
            raise TooFewSitesError(f"round {rnd}: {len(ok)} site(s) trained, min-train-sites is {self.min_sites}"
                                   + (f" (failed: {failures})" if failures else ""))
        if self._pending == rnd - 1:  # its scores came with these replies
            self._end_round(rnd - 1, None, None)
        arrays, metrics = self.inner.aggregate_train(rnd, replies)
        if (spent := client_level_privacy(self.inner)) is not None:
            self.recorder.note(rnd, "client-level-dp", spent)
        if arrays is not None:
            arrays = ArrayRecord(received_state(arrays))  # float32 again (FedAdam computes in float64)
            self.average.update(arrays)
            self._aggregate = arrays
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.done
        self._aggregate = arrays  # the previous one again when this round's aggregation gave none
        evaluated = self.average.model(arrays)
        if self.ensemble_size:
            self._recent = [*self._recent, evaluated][-self.ensemble_size:]
        if rnd == self.num_rounds and self.on_final_model is not None:
            self.on_final_model(evaluated)
        if not self._scored(rnd) or self._scored_in_train(rnd):  # scored with the next round's messages
            return []
        config["adapt-heldout"] = self.adapt_every_round or rnd == self.num_rounds
        messages = self.inner.configure_evaluate(rnd, evaluated, config, _SiteView(grid, self.site_of, set()))
        # held-out sites first: they score all their cases (and may adapt), training sites a quarter,
        # and sites that share cores take their messages in this order
        messages = sorted(messages, key=lambda m: m.metadata.dst_node_id not in self.heldout_nodes)
        return [self._to_heldout_site(m) if m.metadata.dst_node_id in self.heldout_nodes
                else self._to_training_site(m) for m in messages]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.done
        replies = self._record_scores(rnd, self._ordered(replies))
        training = [m for m in replies if m.metadata.src_node_id not in self.heldout_nodes]
        metrics = self.inner.aggregate_evaluate(rnd, training)
        if self._scored_in_train(rnd):
            self.round_log.trained(rnd, self._aggregate, self.average.model(self._aggregate), self.state())
            self._pending = rnd
        else:
            self._end_round(rnd, self._aggregate, self.average.model(self._aggregate))
        return metrics

    # -- helpers ----------------------------------------------------------------------------------

    def _passing(self, rnd: int, replies: list[Message], check: Callable[[str, RecordDict], Any],
                 suffix: str = "") -> tuple[list[Message], dict[int, Any]]:
        """The replies that pass ``check`` (and those that carry a site's error), with what the
        check returned for each that passed; a refused reply is its site's failure for the round."""
        kept, results = [], {}
        for site, m in self._named(replies):
            if not m.has_error():
                try:
                    results[id(m)] = check(site, m.content)
                except ReplyRefused as err:
                    log.warning("round %d: %s's reply refused: %s", rnd, site, err)
                    self.recorder.failed(rnd, site + suffix, f"reply refused: {err}")
                    continue
            kept.append(m)
        return kept, results

    def _record_scores(self, rnd: int, replies: list[Message]) -> list[Message]:
        """Record the evaluation replies that pass their check as round ``rnd``'s scores (a
        refused one is that site's ``/eval`` failure); the replies recorded."""
        replies, _ = self._passing(rnd, replies, self.checks.evaluate_reply, "/eval")
        self.recorder.evaluated(rnd, self._named(replies))
        return replies

    def _scored(self, rnd: int) -> bool:
        return rnd % self.evaluate_every == 0 or rnd >= self.num_rounds

    def _scored_in_train(self, rnd: int) -> bool:
        return self.evaluate_in_train and rnd < self.num_rounds and self._scored(rnd)

    def _end_round(self, rnd: int, aggregate: ArrayRecord | None, evaluated: ArrayRecord | None) -> None:
        """Checkpoint the round (unless done when its training ended) and write its line."""
        self.round_log.ended(rnd, aggregate, evaluated, self.state())
        if self._pending == rnd:
            self._pending = None

    def _restore(self, state: dict[str, Any]) -> None:
        random.setstate(state["random"])
        self.checks.epsilon.update(state.get("epsilon", {}))
        self._recent = [ArrayRecord(m) for m in state.get("recent", [])]
        restore_strategy_state(self.inner, state)

    def _heldout_messages(self, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list[Message]:
        """Held-out sites' evaluation messages for the pending round's model ``arrays`` (no
        moving average is kept where rounds are scored this way)."""
        config = ConfigRecord({**dict(config), "server-round": self._pending,
                               "adapt-heldout": self.adapt_every_round})
        return [self._to_heldout_site(evaluate_message(arrays, config, node))
                for node in sorted(self.heldout_nodes & set(grid.get_node_ids()))]

    def _to_heldout_site(self, msg: Message) -> Message:
        """A held-out site's evaluation message as it travels: with the unseen-site norm set and,
        with ``heldout-ensemble`` K, the K - 1 earlier rounds' models, newest first."""
        if self._recent[:-1]:
            members = [m.to_torch_state_dict() for m in reversed(self._recent[:-1])]
            own = msg.content[ARRAYS].to_torch_state_dict()
            msg = _with_arrays(msg, ArrayRecord(with_ensemble(own, members)))
        return self._on_wire(msg)

    def _on_wire(self, msg: Message) -> Message:
        """The message with its weights as they travel (``_wire``)."""
        arrays = msg.content.array_records.get(ARRAYS)
        return msg if arrays is None else _with_arrays(msg, self._wire(arrays))

    def _to_training_site(self, msg: Message, keep_norms: bool = False) -> Message:
        """A training site's message as it travels: without the unseen-site norm set (unless
        ``keep_norms``), in the wire form. Every training site of a round gets the same weights,
        so that form is made once."""
        source = msg.content.array_records.get(ARRAYS)
        if source is None:
            return msg
        if self._wired is None or self._wired[0] is not source:
            self._wired = (source, self._wire(source if keep_norms else _without_unseen_set(source)))
        return _with_arrays(msg, self._wired[1])

    def _wire(self, arrays: ArrayRecord) -> ArrayRecord:
        return wire_form(arrays, self.transfer_dtype)

    def _admit_late(self, grid: Grid) -> None:
        """Add the run's sites that connected since discovery and answered it now."""
        if self.late_sites is None:
            return
        for node, info in self.late_sites.admit(grid, self.site_of).items():
            self.site_of[node] = info["site"]
            if info["site"] in self.late_sites.heldout_sites:
                self.heldout_nodes.add(node)
            self.checks.declared[info["site"]] = DeclaredSite.from_discovery(info)

    def _wait_for_sites(self, grid: Grid, view: _SiteView, rnd: int) -> None:
        """Wait up to ``round_timeout`` for ``min_sites`` to be connected (admitting the run's
        sites as they come), else stop clearly."""
        deadline = time.monotonic() + self.round_timeout
        while len(view.get_node_ids()) < self.min_sites:
            self._admit_late(grid)
            if time.monotonic() > deadline:
                online = sorted(self.site_of[n] for n in view.get_node_ids())
                raise TooFewSitesError(
                    f"round {rnd}: {len(online)} training site(s) connected {online}, "
                    f"min-train-sites is {self.min_sites}; waited {self.round_timeout:.0f}s")
            time.sleep(1.0)

    def _named(self, replies: list[Message]) -> list[tuple[str, Message]]:
        return [(reply_site(self.site_of, m), m) for m in replies]

    def _ordered(self, replies: Iterable[Message]) -> list[Message]:
        return sorted(replies, key=lambda m: self.site_of.get(m.metadata.src_node_id, ""))


def wire_form(arrays: ArrayRecord, transfer_dtype: str) -> ArrayRecord:
    """``arrays`` as they travel: floating-point tensors in ``transfer_dtype``, packed into one
    flat array per dtype plus a manifest (Flower moves every array as requests of its own)."""
    if transfer_dtype != "float32":
        arrays = wire_record(arrays.to_torch_state_dict(), transfer_dtype)
    return packed_record(arrays)


def evaluate_message(arrays: ArrayRecord, config: ConfigRecord, node: int) -> Message:
    """An evaluation message to ``node``: score ``arrays`` under ``config``."""
    return Message(content=RecordDict({ARRAYS: arrays, CONFIG: config}), message_type=MessageType.EVALUATE,
                   dst_node_id=node)


def reply_site(site_of: dict[int, str], reply: Message) -> str:
    """The site a reply came from; the SuperLink itself answers for a node that went away."""
    node = reply.metadata.src_node_id
    return site_of.get(node, f"superlink-{node}")


def _take_scores(reply: Message) -> dict[str, float]:
    """Remove and return the scores a train reply carries of the model it received."""
    metrics = reply.content[METRICS]
    scores = {k[len(EVAL_PREFIX):]: metrics[k] for k in list(metrics.keys()) if k.startswith(EVAL_PREFIX)}
    if scores:
        reply.content[METRICS] = MetricRecord({k: v for k, v in metrics.items() if not k.startswith(EVAL_PREFIX)})
    return scores


def _without_unseen_set(arrays: ArrayRecord) -> ArrayRecord:
    """The weights without the unseen-site norm set (a training site keeps its own norms)."""
    if not any(k.startswith(UNSEEN_PREFIX) for k in arrays.keys()):
        return arrays
    return ArrayRecord({k: v for k, v in arrays.items() if not k.startswith(UNSEEN_PREFIX)})


def _with_arrays(msg: Message, arrays: ArrayRecord) -> Message:
    """A copy of an outgoing message carrying other weights (everything else as it was)."""
    if msg.content.array_records.get(ARRAYS) is arrays:
        return msg
    content = RecordDict(dict(msg.content))
    content[ARRAYS] = arrays
    return Message(content=content, message_type=msg.metadata.message_type,
                   dst_node_id=msg.metadata.dst_node_id)
