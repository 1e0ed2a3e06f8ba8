"""Flower's own strategies, extended by hook: site-aware ordering, held-out sites, round logging."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg,
                                     FedMedian, FedProx, FedTrimmedAvg, Strategy)

from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.models import UNSEEN_PREFIX, with_ensemble
from fedseg.common.records import ARRAYS, CONFIG, METRICS, packed_record, received_state, wire_record
from fedseg.server.model_average import ModelAverage
from fedseg.server.rounds import RoundRecorder

log = logging.getLogger(__name__)

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "trimmed-mean": FedTrimmedAvg,
}


class TooFewSitesError(RuntimeError):
    """A round ended with fewer successful training sites than ``min-train-sites``."""


class _SiteView:
    """View of a Grid that lists only nodes checked at discovery, minus ``hidden`` ones.

    A node that connects later (not data-checked, shape unknown) is never sampled.
    """

    def __init__(self, grid: Grid, known: dict[int, str], hidden: set[int]) -> None:
        self._grid, self._known, self._hidden = grid, known, hidden

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n in self._known and n not in self._hidden]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SiteHooks:
    """Mixin over a Flower strategy: the round loop stays Flower's (``Strategy.start``).

    - replies are aggregated in a fixed site order, so a seeded run is bit-for-bit repeatable;
    - held-out sites are never sampled for training, but evaluate every round;
    - every reply's scalars and payload size go to the ``RoundRecorder``;
    - a resumed run numbers its rounds from the checkpoint (``round_offset``);
    - sites evaluate ``average.model(aggregate)`` (the moving average when ``dp-ema`` is on);
    - with ``heldout-ensemble`` K, held-out sites also receive the K - 1 previous rounds' models;
    - a run from pretrained weights also sends round 1's training sites the unseen-site norm set
      (then the pretrained model's own norms: nothing of any site), so their local layers start
      from the pretrained norms instead of fresh ones;
    - weights travel in ``transfer-dtype`` (one array per dtype with ``pack-weights``) and are
      aggregated in float32, tensor by tensor;
    - with ``evaluate-in-train``, training sites score round r's model inside round r + 1's train
      message (the server asks for it in that message's config): round r is checkpointed when
      its training ends (``on_round_trained``) and ends (``on_round_end``) when those replies
      arrive; the last round and held-out sites are evaluated by evaluation messages as usual;
    - when a round's evaluation is aggregated, ``on_round_end(round, aggregate, evaluated,
      server state)`` runs, with what a resume needs to continue exactly (``server_state``).
    """

    site_of: dict[int, str]
    heldout_nodes: set[int]
    recorder: RoundRecorder
    round_offset: int
    min_sites: int
    round_timeout: float
    average: ModelAverage
    ensemble_size: int
    transfer_dtype: str
    pack_weights: bool
    evaluate_in_train: bool
    pretrained_start: bool  # round 1's training sites start their local layers from the model's norms
    last_round: int
    pending: tuple[int, ArrayRecord, ArrayRecord, dict[str, Any]] | None  # a round awaiting its scores
    recent: list[ArrayRecord]  # the models sites scored in the last rounds, newest last
    on_round_end: Callable[[int, ArrayRecord, ArrayRecord, dict[str, Any]], None]
    on_round_trained: Callable[[int, ArrayRecord, ArrayRecord, dict[str, Any]], None]
    _round_arrays: tuple[ArrayRecord, ArrayRecord]
    _wired: tuple[ArrayRecord, ArrayRecord] | None  # (a round's weights, their training-site wire form)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        view = _SiteView(grid, self.site_of, self.heldout_nodes)
        self._wait_for_sites(view, server_round + self.round_offset)
        config["evaluate-in-train"] = self.pending is not None  # score the model you receive first
        sampled = super().configure_train(  # type: ignore[misc]
            server_round + self.round_offset, arrays, config, view)
        first = self.pretrained_start and server_round + self.round_offset == 1
        messages = [self._to_training_site(m, keep_norms=first) for m in sampled]
        for m in messages:
            self.recorder.sent(server_round + self.round_offset, self.site_of[m.metadata.dst_node_id],
                               m.content)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = self._ordered(replies)
        rnd = server_round + self.round_offset
        self.recorder.trained(rnd, self._named(replies))
        if self.transfer_dtype != "float32" or self.pack_weights:  # aggregate float32, tensor by tensor
            for m in replies:
                if not m.has_error() and ARRAYS in m.content.array_records:
                    m.content[ARRAYS] = ArrayRecord(received_state(m.content[ARRAYS]))
        ok = [m for m in replies if not m.has_error()]
        if len(ok) < self.min_sites:
            failures = "; ".join(f"{site}: {m.error.reason}" for site, m in self._named(replies)
                                 if m.has_error())
            raise TooFewSitesError(
                f"round {rnd}: {len(ok)} site(s) trained, min-train-sites is {self.min_sites}"
                + (f" (failed: {failures})" if failures else ""))
        if self.pending is not None and self.pending[0] == rnd - 1:  # its scores came with these replies
            self.on_round_end(*self.pending)
            self.pending = None
        arrays, metrics = super().aggregate_train(rnd, replies)  # type: ignore[misc]
        if (spent := client_level_privacy(self)) is not None:  # type: ignore[arg-type]
            self.recorder.note(rnd, "client-level-dp", spent)
        if arrays is not None:
            self.average.update(arrays)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        evaluated = self.average.model(arrays)
        self._round_arrays = (arrays, evaluated)  # the round's aggregate and the model sites score
        rnd = server_round + self.round_offset
        if self.evaluate_in_train and rnd < self.last_round:  # training sites score it next round
            config["server-round"] = rnd
            messages = [Message(content=RecordDict({ARRAYS: evaluated, CONFIG: config}),
                                message_type=MessageType.EVALUATE, dst_node_id=node)
                        for node in sorted(self.heldout_nodes & set(grid.get_node_ids()))]
        else:
            messages = super().configure_evaluate(  # type: ignore[misc]
                rnd, evaluated, config, _SiteView(grid, self.site_of, set()))
        # only sites that never train get the unseen-site norm set (and earlier rounds' models)
        messages = [self._on_wire(self._with_ensemble(m)) if m.metadata.dst_node_id in self.heldout_nodes
                    else self._to_training_site(m) for m in messages]
        if self.ensemble_size:
            self.recent = [*self.recent, evaluated][-(self.ensemble_size - 1):]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = self._ordered(replies)
        rnd = server_round + self.round_offset
        self.recorder.evaluated(rnd, self._named(replies))
        training = [m for m in replies if m.metadata.src_node_id not in self.heldout_nodes]
        metrics = super().aggregate_evaluate(rnd, training)  # type: ignore[misc]
        if self.evaluate_in_train and rnd < self.last_round:
            self.pending = (rnd, *self._round_arrays, server_state(self))
            self.on_round_trained(*self.pending)
        else:
            self.on_round_end(rnd, *self._round_arrays, server_state(self))  # type: ignore[arg-type]
        return metrics

    def _on_wire(self, msg: Message) -> Message:
        """The message with its weights as they travel (``_wire``)."""
        arrays = msg.content.array_records.get(ARRAYS)
        if arrays is None:
            return msg
        wired = self._wire(arrays)
        return msg if wired is arrays else _with_arrays(msg, wired)

    def _to_training_site(self, msg: Message, keep_norms: bool = False) -> Message:
        """A training site's message as it travels: without the unseen-site norm set (unless
        ``keep_norms``), in the wire form. Every training site of a round gets the same weights,
        so that form is made once."""
        source = msg.content.array_records.get(ARRAYS)
        if source is None:
            return msg
        if self._wired is None or self._wired[0] is not source:
            self._wired = (source, self._wire(source if keep_norms else _without_unseen_set(source)))
        return msg if self._wired[1] is source else _with_arrays(msg, self._wired[1])

    def _wire(self, arrays: ArrayRecord) -> ArrayRecord:
        return wire_form(arrays, self.transfer_dtype, self.pack_weights)

    def _with_ensemble(self, msg: Message) -> Message:
        """A held-out site's evaluation message plus the earlier rounds' models, newest first."""
        if not self.recent:
            return msg
        members = [m.to_torch_state_dict() for m in reversed(self.recent)]
        own = msg.content[ARRAYS].to_torch_state_dict()
        return _with_arrays(msg, ArrayRecord(with_ensemble(own, members)))

    def _wait_for_sites(self, view: _SiteView, rnd: int) -> None:
        """Wait up to ``round-timeout`` for ``min-train-sites`` to be connected, else stop clearly."""
        deadline = time.monotonic() + self.round_timeout
        while len(view.get_node_ids()) < self.min_sites:
            if time.monotonic() > deadline:
                online = sorted(self.site_of[n] for n in view.get_node_ids())
                raise TooFewSitesError(
                    f"round {rnd}: {len(online)} training site(s) connected {online}, "
                    f"min-train-sites is {self.min_sites}; waited {self.round_timeout:.0f}s")
            time.sleep(1.0)

    def _named(self, replies: list[Message]) -> list[tuple[str, Message]]:
        """(site, reply) for each reply (``reply_site``)."""
        return [(reply_site(self.site_of, m), m) for m in replies]

    def _ordered(self, replies: Iterable[Message]) -> list[Message]:
        return sorted(replies, key=lambda m: self.site_of.get(m.metadata.src_node_id, ""))


def reply_site(site_of: dict[int, str], reply: Message) -> str:
    """The site a reply came from; the SuperLink itself answers for a node that went away."""
    return site_of.get(reply.metadata.src_node_id, f"superlink-{reply.metadata.src_node_id}")


def wire_form(arrays: ArrayRecord, transfer_dtype: str, pack_weights: bool) -> ArrayRecord:
    """``arrays`` in the run's ``transfer-dtype``, packed into one array per dtype with
    ``pack-weights`` (``arrays`` itself when float32 and unpacked)."""
    if transfer_dtype != "float32":
        arrays = wire_record(arrays.to_torch_state_dict(), transfer_dtype)
    return packed_record(arrays) if pack_weights else arrays


def score_start(grid: Grid, site_of: dict[int, str], arrays: ArrayRecord, config: ConfigRecord,
                cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Every connected site scores the run's starting model as it is (its own norms included:
    the unseen-site norm set) on its validation split, before round 1; site -> its scores (a
    site whose evaluation fails is left out, and logged)."""
    wired = wire_form(arrays, cfg.transfer_dtype, cfg.pack_weights)
    config = ConfigRecord({**dict(config), "server-round": 0})
    messages = [Message(content=RecordDict({ARRAYS: wired, CONFIG: config}), message_type=MessageType.EVALUATE,
                        dst_node_id=node) for node in sorted(set(grid.get_node_ids()) & set(site_of))]
    scores = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        site = reply_site(site_of, reply)
        if reply.has_error():
            log.warning("site %s could not score the starting model: %s", site, reply.error.reason)
        else:
            scores[site] = dict(reply.content[METRICS])
    return dict(sorted(scores.items()))


def _without_unseen_set(arrays: ArrayRecord) -> ArrayRecord:
    """The weights without the unseen-site norm set (a training site keeps its own norms)."""
    if not any(k.startswith(UNSEEN_PREFIX) for k in arrays.keys()):
        return arrays
    return ArrayRecord({k: v for k, v in arrays.items() if not k.startswith(UNSEEN_PREFIX)})


def _with_arrays(msg: Message, arrays: ArrayRecord) -> Message:
    """A copy of an outgoing message carrying other weights (everything else as it was)."""
    content = RecordDict(dict(msg.content))
    content[ARRAYS] = arrays
    return Message(content=content, message_type=msg.metadata.message_type,
                   dst_node_id=msg.metadata.dst_node_id)


def build_strategy(cfg: RunConfig, site_of: dict[int, str], heldout_nodes: set[int],
                   recorder: RoundRecorder,
                   on_round_end: Callable[[int, ArrayRecord, ArrayRecord, dict[str, Any]], None],
                   round_offset: int = 0, average: ModelAverage | None = None,
                   resume_state: dict[str, Any] | None = None,
                   on_round_trained: Callable[[int, ArrayRecord, ArrayRecord, dict[str, Any]], None]
                   = lambda *_: None) -> Strategy:
    """The configured Flower strategy with fedseg's hooks outermost.

    Args:
        cfg: run config (``strategy``, ``fraction-train``, ``min-train-sites``, ``dp``, ...).
        site_of: node id -> site name, from the discovery query.
        heldout_nodes: node ids that only evaluate.
        recorder: collects per-site scalars for rounds.jsonl.
        on_round_end: called with (round, aggregate, evaluated model, server state) once a round
            is complete.
        round_offset: rounds already done (resume).
        average: the server's moving average of the global model (None: none).
        resume_state: ``server_state`` of the checkpoint a resumed run continues from.
        on_round_trained: called like ``on_round_end`` when a round's training ends and its
            scores come with the next round's training replies (``evaluate-in-train``).
    """
    base = BASES[cfg.strategy]
    kwargs: dict[str, Any] = dict(
        fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
        min_train_nodes=cfg.min_train_sites, min_evaluate_nodes=cfg.min_train_sites,
        min_available_nodes=cfg.min_train_sites,
    )
    if base is FedProx:
        kwargs["proximal_mu"] = cfg.proximal_mu
    if base is FedAdam:
        kwargs["eta"] = cfg.server_lr
    if base is FedTrimmedAvg:
        n_train = len(site_of) - len(heldout_nodes)
        if int(cfg.trim_fraction * n_train) == 0:
            raise ConfigError(f"run-config 'trim-fraction' = {cfg.trim_fraction:g} cuts no site with "
                              f"{n_train} training sites (it cuts floor(fraction x sites) from each "
                              f"end): use at least {1 / n_train:.3g}, or strategy=fedmedian")
        kwargs["beta"] = cfg.trim_fraction
    if cfg.dp == "client":
        # Flower's site-level DP: sites clip their update (client mod), the server adds noise
        # and accounts epsilon over rounds; the wrapper needs the stock FedAvg aggregation inside.
        n_train = len(site_of) - len(heldout_nodes)
        sampled = max(int(n_train * cfg.fraction_train), cfg.min_train_sites)
        accountant = RdpAccountant(PrivacyConfig(
            target_delta=cfg.dp_delta, population_size=n_train,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        strategy_cls = type("SiteClientLevelDP", (SiteHooks, DifferentialPrivacyClientSideFixedClipping), {})
        strategy = strategy_cls(base(**kwargs), noise_multiplier=cfg.dp_noise_multiplier,
                                clipping_norm=cfg.dp_max_grad_norm if cfg.dp_max_grad_norm > 0 else 1.0,
                                num_sampled_clients=sampled,
                                accountant=accountant)
    else:
        strategy = type(f"Site{base.__name__}", (SiteHooks, base), {})(**kwargs)
    strategy.site_of = site_of
    strategy.heldout_nodes = heldout_nodes
    strategy.recorder = recorder
    strategy.round_offset = round_offset
    strategy.min_sites = cfg.min_train_sites
    strategy.round_timeout = cfg.round_timeout
    strategy.on_round_end, strategy.on_round_trained = on_round_end, on_round_trained
    strategy.average = average or ModelAverage(0.0)
    strategy.ensemble_size = cfg.heldout_ensemble if heldout_nodes else 0
    strategy.recent = []
    strategy.transfer_dtype, strategy.pack_weights = cfg.transfer_dtype, cfg.pack_weights
    # a moving average is not the model sites train on, and sites left out of a round would not
    # score the last one: both are scored in evaluation messages
    strategy.evaluate_in_train = (cfg.evaluate_in_train and strategy.average.decay == 0
                                  and cfg.fraction_train >= 1.0)
    strategy.pretrained_start = bool(cfg.pretrained_weights)
    strategy.last_round = cfg.num_server_rounds
    strategy.pending = None
    strategy._wired = None
    if resume_state:
        restore_server_state(strategy, resume_state)
    return strategy


def server_state(strategy: Strategy) -> dict[str, Any]:
    """What the strategy carries from round to round beyond the weights: FedOpt's moments (FedAdam
    m_t, v_t), Flower's client-level privacy accountant, and the sampler's random state."""
    state: dict[str, Any] = {"random": random.getstate()}
    if getattr(strategy, "recent", None):  # held-out ensemble members: a resumed run sends them too
        state["recent"] = [m.to_torch_state_dict() for m in strategy.recent]
    for name in ("m_t", "v_t"):
        if (moments := getattr(strategy, name, None)) is not None:
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in moments.items()}
    if (accountant := getattr(strategy, "accountant", None)) is not None:
        state["accountant"] = accountant.state_dict()
    return state


def restore_server_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Inverse of ``server_state``: a resumed run continues as if it had never stopped."""
    random.setstate(state["random"])
    strategy.recent = [ArrayRecord(m) for m in state.get("recent", [])]
    for name in ("m_t", "v_t"):
        if name in state:
            setattr(strategy, name, {k: v.numpy() for k, v in state[name].items()})
    if "accountant" in state:
        strategy.accountant.load_state_dict(state["accountant"])  # type: ignore[attr-defined]


def client_level_privacy(strategy: Strategy) -> dict[str, float] | None:
    """Epsilon/delta spent so far by Flower's client-level accountant (``dp=client``), else None."""
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    return None if spent is None else {"epsilon": spent.epsilon, "delta": spent.delta,
                                       "releases": spent.num_releases}
