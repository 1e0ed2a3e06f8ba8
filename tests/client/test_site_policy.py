"""A site checks every message before it trains: the weights are the model the round config
describes, and the round is within the hospital's own limits, which the server cannot raise. A
refused message names the limit; nothing is trained, nothing is written to the ledger, no weights
leave."""

import json
import re

import pytest
import torch
from flwr.app import ArrayRecord

from fedseg.client.app import app as client_app
from fedseg.client.privacy import LEDGER_FILE
from fedseg.client.site_policy import SitePolicy
from fedseg.client.state import TRAINED_FILE
from fedseg.common.config import RunConfig
from fedseg.common.models import ModelSpec
from fedseg.common.records import received_state
from tests.conftest import local_layers_file, node_context, round_message

pytestmark = pytest.mark.usefixtures("server_identity")

DP = dict(dp="sample", dp_noise_multiplier=1.0, channels=(8, 16), patch_size=32, batch_size=2)


def _message(cfg: RunConfig, message_type: str = "train", extra: dict | None = None):
    return round_message(cfg, ModelSpec(2, 1, 3, cfg.channels, cfg.norm), message_type=message_type, extra=extra)


def _nothing_happened(state) -> None:
    assert local_layers_file(state) is None  # nothing was trained
    assert not (state / LEDGER_FILE).exists()  # nothing was written to the ledger
    assert json.loads((state / "outbox.jsonl").read_text().splitlines()[-1])["records"] == {}  # nothing left


@pytest.mark.parametrize("limit, changes, reason", [
    ({"max-local-epochs": 2}, {"local_epochs": 3}, "local-epochs 3, over its max-local-epochs 2"),
    ({"max-steps": 3}, {"local_epochs": 2}, r"steps \d+, over its max-steps 3"),
    ({"max-batch-size": 1}, {}, "batch-size 2, over its max-batch-size 1"),
    ({"max-patch-size": 16}, {}, "patch-size 32, over its max-patch-size 16"),
    ({"models": "maskrcnn"}, {}, r"model 'unet' is not among its models \['maskrcnn'\]")])
def test_a_round_beyond_the_sites_limits_is_refused_before_anything_is_trained(site, tmp_path, limit, changes,
                                                                              reason):
    cfg = RunConfig(**DP).replace(**changes)
    state = tmp_path / "state"
    # the server "offers" a higher limit in its config: sites read their own node config only
    raised = {k: 1000 for k in limit if k.startswith("max-")}
    reply = client_app(_message(cfg, extra=raised), node_context(site.root, state, **limit))
    assert reply.has_error() and "refuses" in reply.error.reason
    assert re.search(reason, reply.error.reason), reply.error.reason
    _nothing_happened(state)


def test_model_kind_and_patch_limits_apply_to_evaluation_too(site, tmp_path):
    state = tmp_path / "state"
    reply = client_app(_message(RunConfig(**DP), "evaluate"), node_context(site.root, state, **{"max-patch-size": 16}))
    assert reply.has_error() and "over its max-patch-size 16" in reply.error.reason


def test_most_rounds_a_day_counts_every_round_the_site_trained(site, tmp_path):
    state = tmp_path / "state"
    context = node_context(site.root, state, **{"max-rounds-per-day": 1, "max-local-epochs": 1, "max-steps": 3,
                                                "max-batch-size": 2, "max-patch-size": 32, "models": "unet"})
    cfg = RunConfig(channels=(8, 16), patch_size=32, batch_size=2)
    assert not client_app(_message(cfg), context).has_error()  # within every limit
    assert len(json.loads((state / TRAINED_FILE).read_text())) == 1
    again = client_app(_message(cfg.replace(run_name="another-run")), context)
    assert again.has_error()
    assert "trained 1 round(s) in the last 24 hours, its max-rounds-per-day is 1" in again.error.reason


def _corrupt(message, change) -> None:
    state = received_state(message.content["arrays"])
    change(state)
    message.content["arrays"] = ArrayRecord(state)


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.__setitem__(next(iter(s)), torch.full_like(next(iter(s.values())), float("nan"))),
     "non-finite value(s); nothing was trained"),
    (lambda s: s.__setitem__(next(iter(s)), torch.zeros(3)), "is torch.float32 (3,), the model's is torch.float32"),
    (lambda s: s.pop(next(iter(s))), "1 tensor(s) missing"),
    (lambda s: s.__setitem__("smuggled", torch.zeros(1)), "1 unknown ['smuggled']")])
def test_weights_that_are_not_the_described_model_are_refused(site, tmp_path, change, reason):
    state = tmp_path / "state"
    message = _message(RunConfig(**DP))
    _corrupt(message, change)
    reply = client_app(message, node_context(site.root, state))
    assert reply.has_error() and reason in reply.error.reason, reply.error.reason
    _nothing_happened(state)


@pytest.mark.parametrize("raw, error", [({"max-steps": 0}, "max-steps must be >= 1"),
                                        ({"models": "unet,vit"}, "unknown kind(s) ['vit']"),
                                        ({"max-batch-size": "many"}, "bad site policy")])
def test_a_policy_with_a_bad_limit_is_refused_naming_its_source(raw, error):
    with pytest.raises(ValueError, match=r"node config: .*" + re.escape(error)):
        SitePolicy.from_config(raw, "node config")
    assert SitePolicy.from_config({"models": "unet, maskrcnn"}, "x").models == ("unet", "maskrcnn")
