"""Which site am I: a hospital's node config or a simulated partition, and its own policy."""

import json

import pytest

from fedseg.client.site import SIM_POLICIES_FILE, describe_site, resolve_site
from fedseg.common.round_config import SiteData
from fedseg.common.data import DataError, read_site
from fedseg.simulations.synth import write_study


def test_simulated_partitions_map_to_sorted_sites_with_their_policies(tmp_path):
    write_study(tmp_path / "study", sites=2, dims=2, cases=2, size=16, seed=0)
    (tmp_path / "study" / SIM_POLICIES_FILE).write_text(json.dumps({"site-b": {"max-epsilon": 3.0}}))
    data = SiteData(0, 0.25, str(tmp_path / "study"), 0, str(tmp_path / "state"))
    site = resolve_site({"partition-id": 1, "num-partitions": 2}, data)
    assert site.ref.name == "site-b" and site.policy.max_epsilon == 3.0
    assert site.state_dir == tmp_path / "state" / "site-b"
    (tmp_path / "study" / SIM_POLICIES_FILE).write_text(json.dumps({"site-b": {"max_epsilon": 3.0}}))
    with pytest.raises(DataError, match=r"unknown key\(s\) \['max_epsilon'\]"):
        resolve_site({"partition-id": 1}, data)


def test_a_hospital_node_config_wins_and_unknown_keys_are_refused(tmp_path):
    node = {"site-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"),
            "site-name": "hospital-a", "max-epsilon": 8.0, "require-dp": True}
    sent = SiteData(0, 0.25, "/server/study", 0, "/server/state")  # never used by a deployed node
    site = resolve_site(node, sent)
    assert (site.ref.name, site.ref.site_dir, site.state_dir) == ("hospital-a", tmp_path / "data", tmp_path / "state")
    assert site.policy.max_epsilon == 8.0 and site.policy.require_dp
    with pytest.raises(DataError, match="no 'state-dir'"):
        resolve_site({"site-dir": "/data"}, sent)
    with pytest.raises(DataError, match=r"unknown key\(s\) \['require_dp'\]"):
        resolve_site({**node, "require_dp": True}, sent)


def test_a_site_reports_hd95_in_mm_for_nifti_and_in_pixels_for_png(tmp_path):
    """The report labels HD95 with the unit the site's data gives it (NIfTI spacing is in mm)."""
    write_study(tmp_path / "s2", sites=1, dims=2, cases=2, size=16, seed=0)
    write_study(tmp_path / "s3", sites=1, dims=3, cases=2, size=16, seed=0)
    units = {}
    for name in ("s2", "s3"):
        data = SiteData(0, 0.25, str(tmp_path / name), 0, str(tmp_path / "state"))
        info, problems = describe_site(resolve_site({"partition-id": 0}, data), data)
        assert not problems
        units[name] = info["distance-unit"]
    assert units == {"s2": "px", "s3": "mm"}


def test_a_site_sends_its_fingerprint_when_asked_unless_its_policy_keeps_it(tmp_path):
    from fedseg.common.plan import FINGERPRINT, Fingerprint, site_fingerprint

    write_study(tmp_path / "study", sites=2, dims=3, cases=3, size=16, seed=0)
    (tmp_path / "study" / SIM_POLICIES_FILE).write_text(json.dumps({"site-b": {"share-fingerprint": False}}))
    data = SiteData(0, 0.25, str(tmp_path / "study"), 0, str(tmp_path / "state"))
    site_a, site_b = (resolve_site({"partition-id": k}, data) for k in (0, 1))
    assert FINGERPRINT not in describe_site(site_a, data)[0]  # only when the server asks
    sent = describe_site(site_a, data, fingerprint=True)[0]
    assert Fingerprint.from_json(json.loads(sent[FINGERPRINT])) == site_fingerprint(read_site(site_a.ref))
    assert "site-a" not in sent[FINGERPRINT] and ".nii" not in sent[FINGERPRINT]
    kept = describe_site(site_b, data, fingerprint=True)[0]
    assert FINGERPRINT not in kept and kept["no-fingerprint"] == "the site's policy keeps it"


def test_a_late_round_under_the_cosine_schedule_takes_smaller_steps(tmp_path, server_identity):
    """The site trains round r at the schedule's rate for r: the same round moves the weights
    far less near the end of the run than at its start."""
    from fedseg.client.app import app as client_app
    from fedseg.common.config import RunConfig
    from fedseg.common.models import ModelSpec
    from fedseg.simulations.synth import write_study
    from tests.conftest import node_context, round_message

    (site,) = write_study(tmp_path / "study", sites=1, dims=2, cases=4, size=32, seed=0)
    cfg = RunConfig(lr=0.05, lr_schedule="cosine", num_server_rounds=10, batch_size=2, patch_size=32,
                    channels=(8, 16), local_layers="none")
    spec = ModelSpec(2, 1, 3, (8, 16))
    moved = {}
    for rnd in (1, 10):
        sent = round_message(cfg, spec, server_round=rnd)
        before = sent.content["arrays"].to_torch_state_dict()
        reply = client_app(sent, node_context(site, tmp_path / f"state{rnd}"))
        after = reply.content["arrays"].to_torch_state_dict()
        moved[rnd] = sum((after[k] - before[k]).float().norm() for k in before
                         if before[k].is_floating_point())
    assert moved[10] < 0.2 * moved[1]  # lr 0.05 in round 1, 0.05 x 0.024 in round 10
