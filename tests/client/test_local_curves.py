"""A hospital keeps TensorBoard curves of its own training (node config tensorboard=true) in its
state dir; nothing of them is in the reply."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedseg.client.app import app as client_app
from fedseg.client.state import SiteState
from fedseg.common.config import RunConfig
from fedseg.common.models import ModelSpec
from fedseg.server.rounds import TIMING_PREFIX
from fedseg.simulations.synth import write_study
from tests.conftest import node_context, round_message

pytestmark = pytest.mark.usefixtures("server_identity")


def test_a_site_that_asks_keeps_its_step_losses_and_scores_and_sends_the_same_reply(tmp_path):
    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=6, size=32, seed=0)
    cfg = RunConfig(channels=(8, 16), patch_size=32, batch_size=2, local_epochs=2, run_name="curves")
    spec = ModelSpec(2, 1, 3, (8, 16))
    replies = {}
    for curves in (True, False):
        state = tmp_path / f"state-{curves}"
        node = node_context(site, state, tensorboard=curves)
        for rnd in (1, 2):
            replies[curves, rnd] = client_app(round_message(cfg, spec, server_round=rnd,
                                                            extra={"evaluate-in-train": rnd == 2}), node)
    assert not any(r.has_error() for r in replies.values())
    for rnd in (1, 2):  # the same reply either way (its timings aside): the curves stay at the site
        sent = {on: {k: v for k, v in replies[on, rnd].content["metrics"].items() if TIMING_PREFIX not in k}
                for on in (True, False)}
        assert sent[True] == sent[False] and set(replies[True, rnd].content["metrics"]) == set(
            replies[False, rnd].content["metrics"])
    run = SiteState(tmp_path / "state-True").run("curves", "0123456789abcdef").path
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = int(replies[True, 1].content["metrics"]["steps"])
    assert [e.step for e in events.Scalars("train/loss-per-step")] == list(range(1, 2 * steps + 1))
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == [
        (r, round(replies[True, r].content["metrics"]["train-loss"], 5)) for r in (1, 2)]
    assert [e.step for e in events.Scalars("val/dice")] == [1]  # round 1's model, scored in round 2
    assert not (SiteState(tmp_path / "state-False").run("curves", "0123456789abcdef").path / "tensorboard").exists()
