"""Site state belongs to a federation run: local layers are keyed by run (name + id) and model
signature, never reused by another study; a site lists and deletes its runs with `fedseg state`."""

import pytest
import torch

from fedseg.client.app import app as client_app
from fedseg.client.privacy import LEDGER_FILE
from fedseg.client.state import SiteState, run_key
from fedseg.common.cli import main
from fedseg.common.config import RunConfig
from fedseg.common.models import ModelSpec
from tests.conftest import node_context, round_message

pytestmark = pytest.mark.usefixtures("server_identity")
A_ID, B_ID, C_ID = "aaaaaaaa00000000", "bbbbbbbb00000000", "cccccccc00000000"


def _round(cfg: RunConfig, run_id: str, server_round: int, node) -> None:
    reply = client_app(round_message(cfg, ModelSpec(2, 1, 3, cfg.channels), server_round, run_id), node)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""


def test_two_studies_at_one_site_keep_their_own_local_layers(site, tmp_path, capsys):
    state = tmp_path / "state"
    node = node_context(site.root, state)
    study_a = RunConfig(run_name="study", channels=(8, 16), patch_size=32, batch_size=2, lr=1e-9)
    study_b = study_a.replace(channels=(4, 8))  # another coordinator, same run name, other channels
    _round(study_a, A_ID, 1, node)
    path_a = SiteState(state).run("study", A_ID).local_layers_path()
    learned = torch.load(path_a, weights_only=True)
    learned["tensors"] = {k: v + 0.5 for k, v in learned["tensors"].items()}  # as if it had learned
    torch.save(learned, path_a)
    _round(study_b, B_ID, 1, node)  # no size mismatch: its own folder
    _round(study_a, A_ID, 2, node)  # continues from study A's layers, not B's
    again = torch.load(SiteState(state).run("study", A_ID).local_layers_path(), weights_only=True)
    assert again["round"] == 2
    assert all(torch.allclose(again["tensors"][k], v, atol=1e-6) for k, v in learned["tensors"].items())
    _round(study_a, C_ID, 1, node)  # a third federation reusing the name starts fresh
    fresh = torch.load(SiteState(state).run("study", C_ID).local_layers_path(), weights_only=True)
    assert not torch.allclose(next(iter(fresh["tensors"].values())), next(iter(learned["tensors"].values())))

    runs = {r.key: r for r in SiteState(state).runs()}
    assert set(runs) == {run_key("study", i) for i in (A_ID, B_ID, C_ID)}
    assert runs[run_key("study", A_ID)].round == 2 and runs[run_key("study", B_ID)].run_id == B_ID
    assert main(["state", str(state)]) == 0
    listed = capsys.readouterr().out
    assert all(key in listed for key in runs)
    (state / LEDGER_FILE).write_text('{"accountant": "rdp", "history": [[1.0, 0.5, 4]], "rounds": []}')
    assert main(["state", str(state), "--delete", run_key("study", B_ID)]) == 0
    assert {r.key for r in SiteState(state).runs()} == {run_key("study", i) for i in (A_ID, C_ID)}
    assert "history" in (state / LEDGER_FILE).read_text()  # epsilon is the site's: never deleted
    assert main(["state", str(state), "--delete", "nope"]) == 1
    assert "no stored run 'nope'" in capsys.readouterr().err


def test_local_layers_of_another_model_are_refused_by_name(site, tmp_path):
    state = tmp_path / "state"
    node = node_context(site.root, state)
    cfg = RunConfig(run_name="study", channels=(8, 16), patch_size=32, batch_size=2)
    _round(cfg, A_ID, 1, node)
    # the coordinator restarted the same run with another model: the site will not mix them
    reply = client_app(round_message(cfg.replace(channels=(4, 8)), ModelSpec(2, 1, 3, (4, 8)), 2, A_ID), node)
    assert reply.has_error() and "local layers of another model" in reply.error.reason
    assert run_key("study", A_ID) in reply.error.reason


def test_a_mistyped_policy_key_is_refused_not_ignored(site, tmp_path):
    """`max_epsilon=1.0` instead of `max-epsilon`: silently ignoring it would leave the budget open."""
    cfg = RunConfig(run_name="study", channels=(8, 16), patch_size=32, batch_size=2, dp="sample")
    reply = client_app(round_message(cfg, ModelSpec(2, 1, 3, (8, 16)), 1, A_ID),
                       node_context(site.root, tmp_path / "state", max_epsilon=1.0))
    assert reply.has_error() and "unknown key(s) ['max_epsilon']" in reply.error.reason
    assert not (tmp_path / "state" / LEDGER_FILE).exists()


def test_a_round_run_again_after_a_crash_starts_from_the_same_local_layers(site, tmp_path):
    """The coordinator died after a site trained round 3: when round 3 comes again, the site
    trains it from round 2's local layers, so the result is the same as the first time."""
    state = tmp_path / "state"
    node = node_context(site.root, state)
    cfg = RunConfig(run_name="study", channels=(8, 16), patch_size=32, batch_size=2, lr=0.05)
    for rnd in (1, 2, 3):
        _round(cfg, A_ID, rnd, node)
    run = SiteState(state).run("study", A_ID)
    assert run.saved_rounds() == [2, 3]  # the last two rounds are kept
    first = torch.load(run.local_layers_path(3), weights_only=True)["tensors"]
    _round(cfg, A_ID, 3, node)  # round 3 again, as after a coordinator crash
    again = torch.load(run.local_layers_path(3), weights_only=True)["tensors"]
    assert all(torch.equal(first[k], again[k]) for k in first)
