"""Flower's strategies by name and ``SiteStrategy`` around them, through their public methods:
aggregation in a fixed site order, too few sites stop the run, held-out sites scored but never
averaged, every round checkpointed and logged, and a resume that continues exactly."""

import random
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.records import packed_record
from fedseg.server.model_average import ModelAverage
from fedseg.server.reply_checks import DeclaredSite, ReplyChecks
from fedseg.server.run_folder import RunFolder
from fedseg.server.site_strategy import SiteStrategy, TooFewSitesError
from fedseg.server.strategies import build_strategy

pytestmark = pytest.mark.usefixtures("server_identity")

SITES = {11: "site-a", 22: "site-b", 33: "site-c"}
META = {"model": {}, "local_layers": "none", "local_keys": [], "patch_size": 16, "flip_axes": [], "spacing": [],
        "run_name": "r", "run_id": "x"}


def _site_strategy(tmp_path, cfg: RunConfig = RunConfig(), heldout: set[int] = frozenset(), num_rounds: int = 3,
                   **kwargs) -> SiteStrategy:
    """A strategy resumed after round 2 of ``num_rounds`` (its rounds are numbered from 3)."""
    return SiteStrategy(build_strategy(cfg, len(SITES) - len(heldout)), SITES, reply_checks=_checks(),
                        folder=RunFolder(tmp_path),
                        checkpoint_meta=META, num_rounds=num_rounds, heldout_nodes=set(heldout),
                        min_sites=cfg.min_train_sites, ensemble_size=cfg.heldout_ensemble, done=2, **kwargs)


def _checks() -> ReplyChecks:
    """The model is one tensor ``w`` of 2 values; every site declared 10 training and 5 validation cases."""
    return ReplyChecks({"w": torch.zeros(2)}, {site: DeclaredSite(10, 5) for site in SITES.values()})


def _reply(node: int, content: RecordDict | Error, kind: str = MessageType.TRAIN) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=kind)
    TaskIdentity.node_id = node
    return Message(content, reply_to=sent)


def _train_reply(node: int, value: float, examples: int, **extra: float) -> Message:
    return _reply(node, RecordDict({"arrays": ArrayRecord({"w": torch.full((2,), value)}),
                                    "metrics": MetricRecord({"train-loss": 1.0, "num-examples": examples, **extra})}))


def _eval_reply(node: int, dice: float) -> Message:
    return _reply(node, RecordDict({"metrics": MetricRecord({"dice": dice, "num-examples": 2})}), MessageType.EVALUATE)


def test_strategies_by_name_carry_their_settings():
    prox = build_strategy(RunConfig(strategy="fedprox", proximal_mu=0.3), 3)
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    adam = build_strategy(RunConfig(strategy="fedadam", server_lr=0.2), 3)
    assert isinstance(adam, FedAdam) and adam.eta == 0.2
    dp = build_strategy(RunConfig(dp="client", dp_noise_multiplier=0.7, dp_max_grad_norm=2.0), 3)
    assert isinstance(dp, DifferentialPrivacyClientSideFixedClipping) and isinstance(dp.strategy, FedAvg)
    assert (dp.noise_multiplier, dp.clipping_norm) == (0.7, 2.0)


def test_fedavg_weights_sites_by_their_cases_in_site_order_and_logs_the_round(tmp_path):
    strategy = _site_strategy(tmp_path)
    replies = [_train_reply(33, 4.0, 1), _train_reply(11, 1.0, 3), _train_reply(22, 2.0, 4)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # (3 * 1 + 4 * 2 + 1 * 4) / (3 + 4 + 1) = 15 / 8
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 15 / 8))
    strategy.aggregate_evaluate(1, [_eval_reply(n, 0.5) for n in SITES])
    (line,) = RunFolder(tmp_path).read_rounds()
    assert line["round"] == 3 and list(line["train"]) == ["site-a", "site-b", "site-c"]
    assert torch.equal(torch.load(tmp_path / "checkpoints" / "round-3.pt", weights_only=True)["state_dict"]["w"],
                       torch.full((2,), 15 / 8))


def test_fedadam_moves_the_model_by_its_own_rule_not_fedavgs(tmp_path):
    """FedAdam's first step from w0 = 0 with the sites' mean at 1 (round 3 after a resume at 2):
    delta = 1, m = (1 - b1) delta, v = (1 - b2) delta^2, w = w0 + eta_t m / (sqrt(v) + tau) with
    eta_t = eta sqrt(1 - b2^4) / (1 - b1^4): not FedAvg's 1."""
    adam = _site_strategy(tmp_path, RunConfig(strategy="fedadam", server_lr=0.5))
    inner = adam.inner
    inner.current_arrays = {"w": np.zeros(2, dtype=np.float32)}  # what its configure_train keeps
    arrays, _ = adam.aggregate_train(1, [_train_reply(11, 1.0, 1), _train_reply(22, 1.0, 1)])
    eta_t = 0.5 * np.sqrt(1 - inner.beta_2 ** 4) / (1 - inner.beta_1 ** 4)
    step = eta_t * (1 - inner.beta_1) / (np.sqrt(1 - inner.beta_2) + inner.tau)
    w = arrays.to_torch_state_dict()["w"]
    assert w.dtype == torch.float32  # what is checkpointed and sent stays float32
    assert torch.allclose(w.double(), torch.full((2,), float(step), dtype=torch.float64))
    assert not torch.allclose(w, torch.ones(2))  # FedAvg's answer


def test_a_round_with_too_few_sites_stops_with_their_reasons(tmp_path):
    strategy = _site_strategy(tmp_path, RunConfig(min_train_sites=2))
    refused = _reply(22, Error(code=3100, reason="site site-b refuses: over budget"))
    with pytest.raises(TooFewSitesError, match="round 3: 1 site.*site-b: site site-b refuses.*"
                                               "site-c: reply refused: tensor 'w' holds 2 non-finite"):
        strategy.aggregate_train(1, [_train_reply(11, 1.0, 3), refused, _train_reply(33, float("nan"), 3)])


def test_heldout_sites_are_scored_but_not_averaged(tmp_path):
    strategy = _site_strategy(tmp_path, heldout={33})
    strategy.aggregate_train(1, [_train_reply(11, 1.0, 3), _train_reply(22, 2.0, 3)])
    metrics = strategy.aggregate_evaluate(1, [_eval_reply(11, 0.8), _eval_reply(22, 0.6), _eval_reply(33, 0.1)])
    assert metrics["dice"] == pytest.approx(0.7)  # the held-out site is not in the mean
    (line,) = RunFolder(tmp_path).read_rounds()
    assert line["eval"]["site-c"]["dice"] == 0.1 and "site-c" not in line["train"]


def test_scores_inside_train_replies_complete_the_previous_round(tmp_path):
    """Round 3 of 4 is checkpointed when its evaluation step ends (its scores come with round
    4's train replies); round 4's replies bring them, and round 3's line is written then."""
    strategy = _site_strategy(tmp_path, num_rounds=4)
    assert strategy.evaluate_in_train
    strategy.aggregate_train(1, [_train_reply(11, 1.0, 3), _train_reply(22, 2.0, 3), _train_reply(33, 3.0, 3)])
    strategy.aggregate_evaluate(1, [])
    assert RunFolder(tmp_path).read_rounds() == [] and (tmp_path / "checkpoints" / "round-3.pt").is_file()
    strategy.aggregate_train(2, [_train_reply(n, 1.0, 3, **{"eval/dice": 0.25 * i, "eval/num-examples": 2})
                                 for i, n in enumerate(SITES)])
    (line,) = RunFolder(tmp_path).read_rounds()
    assert line["round"] == 3 and {s: e["dice"] for s, e in line["eval"].items()} == {
        "site-a": 0.0, "site-b": 0.25, "site-c": 0.5}


def test_heldout_scores_sent_beside_the_next_rounds_training_complete_the_round_they_score(tmp_path):
    """A resume after round 2 of 4 (its scores still to come): round 3's replies carry the training
    sites' scores of round 2's model and the held-out site's evaluation reply, which counts for
    round 2 and never for round 3's average; a held-out reply that fails its check is round 2's
    failure of that site's evaluation."""
    pending = {"train": {"site-a": {"train-loss": 1.0}}, "eval": {}, "errors": {}, "bytes-down": {}, "time": {}}
    strategy = _site_strategy(tmp_path, heldout={33}, num_rounds=4, pending_record=pending)
    arrays, metrics = strategy.aggregate_train(1, [
        _train_reply(11, 1.0, 3, **{"eval/dice": 0.5, "eval/num-examples": 2}),
        _train_reply(22, 3.0, 3, **{"eval/dice": 0.7, "eval/num-examples": 2}), _eval_reply(33, 0.25)])
    assert torch.equal(arrays.to_torch_state_dict()["w"], torch.full((2,), 2.0))  # site-c not averaged
    (line,) = RunFolder(tmp_path).read_rounds()
    assert line["round"] == 2 and {s: e["dice"] for s, e in line["eval"].items()} == {
        "site-a": 0.5, "site-b": 0.7, "site-c": 0.25}
    assert "site-c" not in strategy.recorder.peek(3)["train"]
    again = _site_strategy(tmp_path / "again", heldout={33}, num_rounds=4, pending_record=pending)
    again.aggregate_train(1, [_train_reply(11, 1.0, 3), _train_reply(22, 3.0, 3), _eval_reply(33, 1.5)])
    (line,) = RunFolder(tmp_path / "again").read_rounds()
    assert "site-c" not in line["eval"] and "dice = 1.5 is outside [0, 1]" in line["errors"]["site-c/eval"]


def test_sites_score_in_evaluation_messages_where_some_would_not_train_the_model(tmp_path):
    assert not _site_strategy(tmp_path, RunConfig(fraction_train=0.5)).evaluate_in_train
    averaged = _site_strategy(tmp_path, average=ModelAverage(0.7))
    assert not averaged.evaluate_in_train  # sites train on the aggregate, the run scores the average


def test_the_state_carries_fedadam_moments_the_accountant_the_ensemble_and_the_sampler(tmp_path):
    adam = _site_strategy(tmp_path, RunConfig(strategy="fedadam"))
    adam.inner.m_t, adam.inner.v_t = {"w": np.full(2, 0.5)}, {"w": np.full(2, 0.25)}
    random.seed(7)
    state = adam.state()
    expected = random.random()
    fresh = _site_strategy(tmp_path, RunConfig(strategy="fedadam"), server_state=state)
    assert np.array_equal(fresh.inner.m_t["w"], adam.inner.m_t["w"])
    assert np.array_equal(fresh.inner.v_t["w"], adam.inner.v_t["w"])
    assert random.random() == expected  # Flower samples sites with `random`: same draw as before
    dp = _site_strategy(tmp_path, RunConfig(dp="client", dp_noise_multiplier=0.7))
    dp.inner.accountant.compose(GaussianPrivacyEvent(noise_multiplier=0.7, sample_size=3, population_size=3))
    spent = dp.inner.privacy_spent().epsilon
    resumed = _site_strategy(tmp_path, RunConfig(dp="client", dp_noise_multiplier=0.7), server_state=dp.state())
    assert resumed.inner.privacy_spent().epsilon == pytest.approx(spent) and spent > 0


@pytest.mark.parametrize("strategy, extra", [("fedmedian", {}), ("trimmed-mean", {"trim_fraction": 0.34})])
def test_robust_strategies_withstand_a_poisoned_update_and_fedavg_does_not(tmp_path, strategy, extra):
    """Site c sends its weights scaled by 100 (a broken or hostile site)."""
    def replies():  # fresh each time: Flower's robust strategies consume the replies' arrays
        return [_train_reply(11, 1.0, 4), _train_reply(22, 1.2, 4), _train_reply(33, 100 * 1.1, 4)]

    robust = _site_strategy(tmp_path / "robust", RunConfig(strategy=strategy, **extra))
    value = robust.aggregate_train(1, replies())[0].to_torch_state_dict()["w"]
    assert torch.allclose(value, torch.full((2,), 1.2))  # the median / the middle site's
    mean = _site_strategy(tmp_path / "mean").aggregate_train(1, replies())[0].to_torch_state_dict()["w"]
    assert torch.allclose(mean, torch.full((2,), (1.0 + 1.2 + 110.0) / 3))  # dragged away


def test_a_trimmed_mean_that_trims_nothing_is_refused():
    with pytest.raises(ConfigError, match=r"'trim-fraction' = 0.2 cuts no site with 3 training sites"):
        build_strategy(RunConfig(strategy="trimmed-mean"), 3)  # Flower's default 0.2 x 3 sites = 0


def test_packed_replies_are_averaged_tensor_by_tensor(tmp_path):
    strategy = _site_strategy(tmp_path)
    replies = [_train_reply(11, 1.0, 3), _train_reply(22, 2.0, 1)]
    replies[0].content["arrays"] = packed_record(replies[0].content["arrays"])  # one site packs
    arrays, _ = strategy.aggregate_train(1, replies)
    assert list(arrays.keys()) == ["w"]
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 5 / 4))


@pytest.mark.parametrize("argument, value", [("num_rounds", 0), ("min_sites", 0), ("ensemble_size", 1),
                                             ("transfer_dtype", "bfloat16"), ("round_timeout", 0)])
def test_a_strategy_with_a_bad_argument_is_refused_by_name(tmp_path, argument, value):
    kwargs = {"num_rounds": 3, argument: value}
    with pytest.raises(ValueError, match=f"SiteStrategy: {argument}"):
        SiteStrategy(FedAvg(), SITES, reply_checks=_checks(), folder=RunFolder(tmp_path), checkpoint_meta=META,
                     **kwargs)


def _nan(reply: Message) -> None:
    reply.content["arrays"] = ArrayRecord({"w": torch.tensor([1.0, float("nan")])})


def _wrong_shape(reply: Message) -> None:
    reply.content["arrays"] = ArrayRecord({"w": torch.ones(3)})


def _extra_tensor(reply: Message) -> None:
    reply.content["arrays"] = ArrayRecord({"w": torch.ones(2), "smuggled": torch.ones(1)})


def _broken_manifest(reply: Message) -> None:
    packed = dict(packed_record(reply.content["arrays"]).items())
    packed["packed/float32"] = ArrayRecord({"x": torch.ones(5)})["x"]  # 5 values, the manifest names 2
    reply.content["arrays"] = ArrayRecord(packed)


def _claims(count: float):
    def change(reply: Message) -> None:
        reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), "num-examples": count})
    return change


def _score(key: str, value: float):
    def change(reply: Message) -> None:
        reply.content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), key: value,
                                                 "eval/num-examples": 2})
    return change


@pytest.mark.parametrize("corrupt, reason", [
    (_nan, "tensor 'w' holds 1 non-finite value"), (_wrong_shape, r"tensor 'w' is torch.float32 \(3,\)"),
    (_extra_tensor, r"1 unknown \['smuggled'\]"), (_broken_manifest, "more values than their manifest names"),
    (_claims(10**9), "num-examples = 1000000000 where the site declared 10 training"),
    (_claims(2.5), "num-examples = 2.5"), (_score("eval/dice", 1.5), r"dice = 1.5 is outside \[0, 1\]"),
    (_score("train-loss", float("inf")), "train-loss not finite")])
def test_a_reply_that_fails_a_check_is_the_sites_failure_and_never_averaged(tmp_path, corrupt, reason):
    strategy = _site_strategy(tmp_path)
    hostile = _train_reply(33, 7.0, 3)
    corrupt(hostile)
    arrays, _ = strategy.aggregate_train(1, [_train_reply(11, 1.0, 3), _train_reply(22, 2.0, 1), hostile])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 5 / 4))  # the honest sites'
    strategy.aggregate_evaluate(1, [_eval_reply(n, 0.5) for n in SITES])
    (line,) = RunFolder(tmp_path).read_rounds()
    assert list(line["train"]) == ["site-a", "site-b"]
    assert re.search(reason, line["errors"]["site-c"]) and line["errors"]["site-c"].startswith("reply refused")


def test_a_site_whose_epsilon_goes_down_is_refused_and_a_resume_remembers_its_budget(tmp_path):
    strategy = _site_strategy(tmp_path, num_rounds=4)
    strategy.aggregate_train(1, [_train_reply(11, 1.0, 3, epsilon=2.0), _train_reply(22, 2.0, 3, epsilon=2.5),
                                 _train_reply(33, 3.0, 3, epsilon=2.5)])
    resumed = _site_strategy(tmp_path / "resumed", num_rounds=4, server_state=strategy.state())
    arrays, _ = resumed.aggregate_train(2, [_train_reply(11, 1.0, 3, epsilon=1.0),  # below its 2.0
                                            _train_reply(22, 2.0, 3, epsilon=2.5),  # as before: no steps
                                            _train_reply(33, 3.0, 3, epsilon=3.0)])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2,), 2.5))  # sites b and c
    resumed.aggregate_evaluate(2, [_eval_reply(n, 0.5) for n in SITES])
    errors = RunFolder(tmp_path / "resumed").read_rounds()[-1]["errors"]
    assert "epsilon 1 is below the 2 it has already spent" in errors["site-a"]


def test_scores_out_of_range_are_refused_in_evaluation_replies_too(tmp_path):
    strategy = _site_strategy(tmp_path, heldout={33})
    strategy.aggregate_train(1, [_train_reply(11, 1.0, 3), _train_reply(22, 2.0, 3)])
    too_many = _reply(22, RecordDict({"metrics": MetricRecord({"dice": 0.6, "num-examples": 50})}),
                      MessageType.EVALUATE)
    metrics = strategy.aggregate_evaluate(1, [_eval_reply(11, 0.8), too_many, _eval_reply(33, -0.1)])
    assert metrics["dice"] == pytest.approx(0.8)
    (line,) = RunFolder(tmp_path).read_rounds()
    assert set(line["eval"]) == {"site-a"}
    assert "declared 5 validation" in line["errors"]["site-b/eval"]
    assert "dice = -0.1 is outside [0, 1]" in line["errors"]["site-c/eval"]
