"""Nothing identifying leaves a site: with case files named after a patient, no reply, error
reason or metric name carries the name or a site path (the site's own log keeps the detail)."""

import pytest

from fedseg.client.app import app as client_app
from fedseg.client.privacy import LEDGER_FILE
from fedseg.common.config import RunConfig
from fedseg.common.models import ModelSpec
from fedseg.simulations.synth import write_study
from tests.conftest import node_context, rename_cases, round_message

pytestmark = pytest.mark.usefixtures("server_identity")
CANARY = "SMITH-JOHN-19550101"


def canary_site(root):
    """A site whose case files (and fairness groups) carry a patient's name and birth date."""
    (site,) = write_study(root, sites=1, dims=2, cases=6, size=32, seed=0)
    rename_cases(site, CANARY)
    return site


def test_replies_and_errors_never_carry_file_names_or_paths(tmp_path):
    site = canary_site(tmp_path / "study")
    state = tmp_path / "hospital-state"
    cfg = RunConfig(channels=(8, 16), patch_size=32, batch_size=2, min_group_cases=1, val_fraction=0.5)
    spec = ModelSpec(2, 1, 3, (8, 16))
    node = node_context(site, state, **{"min-group-cases": 1})  # the site lowers its own k-threshold
    replies = [client_app(round_message(cfg, spec, message_type=t), node) for t in ("query", "train", "evaluate")]
    assert not any(r.has_error() for r in replies)
    group_keys = [k for k in replies[2].content["metrics"] if k.startswith("group-")]
    assert group_keys and all(k.split(":")[1].startswith("group-") for k in group_keys)  # not "<name>_0"
    state.joinpath(LEDGER_FILE).write_text("{ torn")  # an error whose message names the ledger's path
    refused = client_app(round_message(cfg.replace(dp="sample"), spec), node)
    assert refused.has_error() and "privacy ledger unreadable" in refused.error.reason
    assert "<state-dir>" in refused.error.reason
    sent = (state / "outbox.jsonl").read_text()  # everything that left, as the site audited it
    assert sent.count("\n") == 4 and CANARY not in sent and str(tmp_path) not in sent
