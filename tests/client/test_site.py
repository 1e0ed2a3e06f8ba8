"""Which site am I: a hospital's node config or a simulated partition, and its own policy."""

import json

import pytest

from fedseg.client.site import SIM_POLICIES_FILE, resolve_site
from fedseg.common.config import SiteData
from fedseg.common.data import DataError
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
