"""Real processes on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication."""

import json
import time

import pytest
import torch

from fedseg.client.state import SiteState
from fedseg.simulations.synth import write_study
from tests.deployment.federation import Federation

RUN = "patch-size=32 channels='8,16' batch-size=2 lr=0.05"


@pytest.fixture()
def federation(tmp_path):
    fed = Federation(tmp_path)
    write_study(tmp_path / "study", sites=3, dims=2, cases=5, size=32, seed=0)
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.stop()


def _local_layers(state_dir, run_dir):
    info = json.loads((run_dir / "run.json").read_text())
    return SiteState(state_dir).run(info["config"]["run-name"], info["run_id"]).local_layers_path()


def _rounds(run_dir):
    path = run_dir / "rounds.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_tls_federation_refuses_unregistered_node_and_resumes_after_server_restart(federation, tmp_path):
    fed, study, runs = federation, tmp_path / "study", tmp_path / "runs"
    for site in ("site-a", "site-b"):
        fed.start_supernode(site, fed.node_key(site), study / site, tmp_path / "state" / site)
    intruder = fed.start_supernode("site-c", fed.node_key("site-c", register=False), study / "site-c",
                                   tmp_path / "state" / "site-c")
    fed.wait_for(lambda: intruder.poll() is not None, 60, "the unregistered SuperNode to be refused")
    assert intruder.returncode != 0
    assert "No SuperNode found with the given public key" in fed.log_of("superlink")

    out = fed.flwr("run", ".", "fedseg", "--stream", "--run-config",
                   f"{RUN} num-server-rounds=1 output-dir='{runs}' run-name='tls'", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run_dir = runs / "tls"
    assert "fedseg round 1/1 done" in out.stdout  # fedseg's lines reach the coordinator's stream
    assert "fedseg site site-a round 1: loss" in fed.log_of("site-a")  # and each hospital's output
    (first,) = _rounds(run_dir)
    assert sorted(first["train"]) == ["site-a", "site-b"] and not first["errors"]
    assert not (tmp_path / "state" / "site-c").exists()  # the refused node trained nothing
    assert _local_layers(tmp_path / "state" / "site-a", run_dir).is_file()

    # the coordinator's SuperLink restarts; the run continues from its checkpoint
    fed.kill("superlink")
    fed.start_superlink()
    out = fed.flwr("run", ".", "fedseg", "--stream", "--run-config",
                   f"num-server-rounds=2 output-dir='{runs}' run-name='tls' resume=true", timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rounds = _rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0] == first
    assert sorted(rounds[1]["train"]) == ["site-a", "site-b"]


def test_site_dropping_out_mid_round_and_rejoining_with_its_ledger(federation, tmp_path):
    fed, study, runs = federation, tmp_path / "study", tmp_path / "runs"
    keys = {site: fed.node_key(site) for site in ("site-a", "site-b")}
    state = {site: tmp_path / "state" / site for site in keys}
    for site in keys:
        fed.start_supernode(site, keys[site], study / site, state[site])
    fed.start_run(f"{RUN} num-server-rounds=4 output-dir='{runs}' run-name='drop' dp='sample' "
                  "min-train-sites=1 round-timeout=30.0")
    run_dir = runs / "drop"
    fed.wait_for(lambda: len(_rounds(run_dir)) >= 1, 240, "round 1")
    fed.wait_for(lambda: fed.log_of("site-b").count("Receiving: train message") >= 2, 120,
                 "site-b to receive its round-2 training message")
    fed.kill("site-b")  # mid-round: its round-2 message is lost with it
    killed = time.monotonic()
    fed.wait_for(lambda: len(_rounds(run_dir)) >= 2, 240, "round 2 to complete without site-b")
    round2_s = time.monotonic() - killed
    rejoin_s = fed.restart_supernode("site-b", keys["site-b"], study / "site-b", state["site-b"])
    fed.wait_for(lambda: (run_dir / "summary.json").is_file(), 400, "the run to finish")
    rounds = _rounds(run_dir)
    assert sorted(rounds[0]["train"]) == ["site-a", "site-b"]
    assert list(rounds[1]["train"]) == ["site-a"] and "no reply" in rounds[1]["errors"]["site-b"]
    assert all("site-a" in r["train"] for r in rounds)  # the run never stopped
    assert sorted(rounds[-1]["train"]) == ["site-a", "site-b"]  # rejoined with its own node identity
    ledger = json.loads((state["site-b"] / "privacy_ledger.json").read_text())
    trained = [r["round"] for r in rounds if "site-b" in r["train"]]
    assert [r["round"] for r in ledger["rounds"]] == trained  # the ledger survived the crash
    eps = [r["epsilon"] for r in ledger["rounds"]]
    assert eps == sorted(eps) and rounds[-1]["train"]["site-b"]["epsilon"] == pytest.approx(eps[-1])
    saved_round = torch.load(_local_layers(state["site-b"], run_dir), weights_only=True)["round"]
    assert saved_round == rounds[-1]["round"]  # its local layers kept training where they left off
    print(f"round 2 completed {round2_s:.1f}s after site-b was killed (round-timeout 30s); "
          f"site-b was re-admitted {rejoin_s:.1f}s after it restarted")
