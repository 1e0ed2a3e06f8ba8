"""The strategy builder: Flower's strategies by name with fedseg's hooks outermost; aggregation
is FedAvg's sample-weighted mean in a fixed site order; too few sites stop the run."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedProx
from flwr.supercore.task_identity import TaskIdentity

from fedseg.common.config import RunConfig
from fedseg.server.rounds import RoundRecorder
from fedseg.server.strategies import SiteHooks, TooFewSitesError, build_strategy

pytestmark = pytest.mark.usefixtures("server_identity")

SITES = {11: "site-a", 22: "site-b", 33: "site-c"}


def _build(cfg: RunConfig, heldout: set[int] = frozenset(), ended=None, resume_state=None):
    ended = [] if ended is None else ended
    strategy = build_strategy(cfg, SITES, set(heldout), RoundRecorder(),
                              lambda r, aggregate, evaluated, state: ended.append(r), round_offset=2,
                              resume_state=resume_state)
    return strategy, ended


def _train_reply(node: int, value: float, examples: int) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = node
    return Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((2,), value)}),
                               "metrics": MetricRecord({"train-loss": 1.0, "num-examples": examples})}),
                   reply_to=sent)


def test_strategies_by_name_carry_their_settings_under_fedsegs_hooks():
    prox, _ = _build(RunConfig(strategy="fedprox", proximal_mu=0.3))
    assert isinstance(prox, SiteHooks) and isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    adam, _ = _build(RunConfig(strategy="fedadam", server_lr=0.2))
    assert isinstance(adam, FedAdam) and adam.eta == 0.2
    dp, _ = _build(RunConfig(dp="client", dp_noise_multiplier=0.7, dp_max_grad_norm=2.0))
    assert isinstance(dp, DifferentialPrivacyClientSideFixedClipping)
    assert (dp.noise_multiplier, dp.clipping_norm) == (0.7, 2.0)


def test_fedavg_weights_sites_by_their_cases_in_site_order():
    strategy, _ = _build(RunConfig(min_train_sites=2))
    replies = [_train_reply(33, 4.0, 1), _train_reply(11, 1.0, 3), _train_reply(22, 2.0, 4)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # (3 * 1 + 4 * 2 + 1 * 4) / (3 + 4 + 1) = 15 / 8
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 15 / 8))
    record = strategy.recorder.pop(3)  # round 1 after a resume at round 2
    assert list(record["train"]) == ["site-a", "site-b", "site-c"]


def test_a_round_with_too_few_sites_stops_with_their_reasons():
    strategy, _ = _build(RunConfig(min_train_sites=2))
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=22, message_type=MessageType.TRAIN)
    TaskIdentity.node_id = 22
    refused = Message(Error(code=3100, reason="site site-b refuses: over budget"), reply_to=sent)
    with pytest.raises(TooFewSitesError, match="round 3: 1 site.*site-b: site site-b refuses"):
        strategy.aggregate_train(1, [_train_reply(11, 1.0, 3), refused])


def test_heldout_sites_are_scored_but_not_averaged_and_the_round_end_hook_runs():
    strategy, ended = _build(RunConfig(), heldout={33})
    strategy._round_arrays = (ArrayRecord({"w": torch.zeros(2)}),) * 2
    replies = []
    for node, dice in ((11, 0.8), (22, 0.6), (33, 0.1)):
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                       message_type=MessageType.EVALUATE)
        TaskIdentity.node_id = node
        replies.append(Message(RecordDict({"metrics": MetricRecord({"dice": dice, "num-examples": 2})}),
                               reply_to=sent))
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["dice"] == pytest.approx(0.7)  # the held-out site is not in the mean
    assert strategy.recorder.pop(3)["eval"]["site-c"]["dice"] == 0.1
    assert ended == [3]


def test_server_state_carries_fedadam_moments_the_accountant_and_the_sampler():
    import random

    import numpy as np

    from fedseg.server.strategies import server_state

    adam, _ = _build(RunConfig(strategy="fedadam"))
    adam.m_t, adam.v_t = {"w": np.full(2, 0.5)}, {"w": np.full(2, 0.25)}
    random.seed(7)
    state = server_state(adam)
    expected = random.random()
    fresh, _ = _build(RunConfig(strategy="fedadam"), resume_state=state)
    assert np.array_equal(fresh.m_t["w"], adam.m_t["w"]) and np.array_equal(fresh.v_t["w"], adam.v_t["w"])
    assert random.random() == expected  # Flower samples sites with `random`: same draw as before
    dp, _ = _build(RunConfig(dp="client", dp_noise_multiplier=0.7))
    dp.accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.7, sample_size=3, population_size=3))
    spent = dp.privacy_spent().epsilon
    resumed, _ = _build(RunConfig(dp="client", dp_noise_multiplier=0.7), resume_state=server_state(dp))
    assert resumed.privacy_spent().epsilon == pytest.approx(spent) and spent > 0
    ensemble, _ = _build(RunConfig(heldout_ensemble=3), heldout={33})
    ensemble.recent = [ArrayRecord({"w": torch.full((2,), float(r))}) for r in (1, 2)]
    resumed, _ = _build(RunConfig(heldout_ensemble=3), heldout={33}, resume_state=server_state(ensemble))
    # a resumed run still sends held-out sites the models of the rounds before the restart
    assert [m.to_torch_state_dict()["w"][0].item() for m in resumed.recent] == [1.0, 2.0]


@pytest.mark.parametrize("strategy, extra", [("fedmedian", {}), ("trimmed-mean", {"trim_fraction": 0.34})])
def test_robust_strategies_withstand_a_poisoned_update_and_fedavg_does_not(strategy, extra):
    """Site c sends its weights scaled by 100 (a broken or hostile site)."""
    def replies():  # fresh each time: Flower's robust strategies consume the replies' arrays
        return [_train_reply(11, 1.0, 4), _train_reply(22, 1.2, 4), _train_reply(33, 100 * 1.1, 4)]

    robust, _ = _build(RunConfig(strategy=strategy, **extra))
    value = robust.aggregate_train(1, replies())[0].to_torch_state_dict()["w"]
    assert torch.allclose(value, torch.full((2,), 1.2))  # the median / the middle site's
    fedavg, _ = _build(RunConfig())
    mean = fedavg.aggregate_train(1, replies())[0].to_torch_state_dict()["w"]
    assert torch.allclose(mean, torch.full((2,), (1.0 + 1.2 + 110.0) / 3))  # dragged away


def test_a_trimmed_mean_that_trims_nothing_is_refused():
    from fedseg.common.config import ConfigError

    with pytest.raises(ConfigError, match=r"'trim-fraction' = 0.2 cuts no site with 3 training sites"):
        _build(RunConfig(strategy="trimmed-mean"))  # Flower's default 0.2 x 3 sites = 0


def test_packed_replies_are_averaged_tensor_by_tensor():
    from fedseg.common.records import packed_record

    strategy, _ = _build(RunConfig(min_train_sites=2))
    replies = [_train_reply(11, 1.0, 3), _train_reply(22, 2.0, 1)]
    replies[0].content["arrays"] = packed_record(replies[0].content["arrays"])  # one site packs
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays.keys()) == ["w"]
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 5 / 4))


def test_scores_come_inside_train_messages_only_where_every_site_trains_the_model_it_scores():
    assert _build(RunConfig())[0].evaluate_in_train  # the default: one message per site and round
    assert not _build(RunConfig(evaluate_in_train=False))[0].evaluate_in_train
    assert not _build(RunConfig(fraction_train=0.5))[0].evaluate_in_train  # skipped sites would not score
    from fedseg.server.model_average import ModelAverage

    averaged = build_strategy(RunConfig(), SITES, set(), RoundRecorder(), lambda *_: None,
                              average=ModelAverage(0.7))
    assert not averaged.evaluate_in_train  # sites train on the aggregate, the run scores the average
