"""Real processes on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication."""

import json
import time

import pytest
import torch

from fedseg.simulations.synth import write_study
from tests.conftest import local_layers_file, read_rounds, rename_cases
from tests.deployment.federation import Federation
from tests.deployment.replay import replay

CANARY = "SMITH-JOHN-19550101"

# float32: a deployed site's process computes on more threads than a simulated one, and bf16
# sums (amp=auto on a CPU with bf16 units) depend on that order, so the replay would differ
RUN = "patch-size=32 channels='8,16' batch-size=2 lr=0.05 amp='off'"


@pytest.fixture()
def federation(tmp_path):
    fed = Federation(tmp_path)
    write_study(tmp_path / "study", sites=3, dims=2, cases=5, size=32, seed=0)
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.stop()


def test_short_soak_survives_an_intruder_a_coordinator_crash_and_a_site_crash_with_the_uninterrupted_model(
        federation, tmp_path):
    """TLS + node auth, 20 rounds: an unregistered node is refused; the coordinator (SuperLink and
    ServerApp) and site-b are killed -9 mid-round 7, the run resumes without site-b and admits it
    when it is back; site-b is killed -9 again mid-round and restarted. Every round completes, and
    the final model is the one an uninterrupted simulation of the same sequence makes (site-b
    missing the rounds it missed); site-a's case files carry a patient's name, which never leaves it."""
    fed, study, runs = federation, tmp_path / "study", tmp_path / "runs"
    rename_cases(study / "site-a", CANARY)
    keys = {site: fed.node_key(site) for site in ("site-a", "site-b")}
    state = {site: tmp_path / "state" / site for site in keys}
    for site in keys:
        fed.start_supernode(site, keys[site], study / site, state[site])
    intruder = fed.start_supernode("site-c", fed.node_key("site-c", register=False), study / "site-c",
                                   tmp_path / "state" / "site-c")
    fed.wait_for(lambda: intruder.poll() is not None, 60, "the unregistered SuperNode to be refused")
    assert intruder.returncode != 0
    assert "No SuperNode found with the given public key" in fed.log_of("superlink")

    run_dir, checkpoint = runs / "soak", lambda n: (runs / "soak" / "checkpoints" / f"round-{n}.pt").is_file()
    fed.start_run(f"{RUN} num-server-rounds=20 local-layers='none' min-train-sites=1 round-timeout=30.0 "
                  f"output-dir='{runs}' run-name='soak'")
    fed.wait_for(lambda: checkpoint(6) and all(fed.log_of(s).count("Receiving: train message") >= 7 for s in keys),
                 300, "both sites to receive their round-7 training message")
    for name in ("superlink", "flwr-run", "site-b"):  # the SuperLink's process group holds the ServerApp
        fed.kill(name)
    assert "fedseg round 6/20 trained" in fed.log_of("flwr-run")  # fedseg's lines reach the coordinator
    assert "fedseg site site-a round 6: loss" in fed.log_of("site-a")  # and each hospital's output
    assert not (tmp_path / "state" / "site-c").exists()  # the refused node trained nothing
    fed.start_superlink()
    fed.start_run(f"num-server-rounds=20 output-dir='{runs}' run-name='soak' resume=true")
    fed.wait_for(lambda: checkpoint(8), 300, "the resumed run's round 8, without site-b")
    fed.restart_supernode("site-b", keys["site-b"], study / "site-b", state["site-b"])
    fed.wait_for(lambda: checkpoint(12), 300, "round 12")
    received = fed.log_of("site-b").count("Receiving: train message")
    fed.wait_for(lambda: fed.log_of("site-b").count("Receiving: train message") > received, 120,
                 "site-b to receive its next training message")
    fed.kill("site-b")  # mid-round: its message is lost with it
    fed.restart_supernode("site-b", keys["site-b"], study / "site-b", state["site-b"])
    fed.wait_for(lambda: (run_dir / "summary.json").is_file(), 400, "the run to finish")
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, 21))
    assert all("site-a" in r["train"] for r in rounds)  # the run never stopped
    missed = [r["round"] for r in rounds if "site-b" not in r["train"]]
    killed = [n for n in missed if n >= 13]
    assert {7, 8} <= set(missed) and killed  # down across the resume, then killed mid-round
    assert "no reply" in rounds[killed[0] - 1]["errors"]["site-b"]
    assert "site site-b" in fed.log_of("flwr-run") and "joins the run" in fed.log_of("flwr-run")
    assert sorted(rounds[-1]["train"]) == ["site-a", "site-b"]  # rejoined with its own node identity

    replayed = replay(run_dir, study, tmp_path / "replay")
    assert [sorted(r["train"]) for r in read_rounds(replayed)] == [sorted(r["train"]) for r in rounds]
    final, reference = (torch.load(d / "model" / "global.pt", weights_only=True)["state_dict"]
                        for d in (run_dir, replayed))
    assert all(torch.allclose(final[k], reference[k], rtol=0, atol=1e-6) for k in reference)
    for site, scores in read_rounds(replayed)[-1]["eval"].items():
        assert rounds[-1]["eval"][site]["dice"] == pytest.approx(scores["dice"], abs=1e-5)

    seen = [fed.log_of("flwr-run"), fed.log_of("superlink")] + [
        (run_dir / f).read_text() for f in ("rounds.jsonl", "summary.json", "run.json", "report.html")]
    assert not any(CANARY in text for text in seen)  # nothing identifying left site-a
    print(f"20 rounds through a coordinator crash and a site crash; site-b missed rounds {missed}")


def test_site_dropping_out_mid_round_and_rejoining_with_its_ledger(federation, tmp_path):
    fed, study, runs = federation, tmp_path / "study", tmp_path / "runs"
    keys = {site: fed.node_key(site) for site in ("site-a", "site-b")}
    state = {site: tmp_path / "state" / site for site in keys}
    for site in keys:
        fed.start_supernode(site, keys[site], study / site, state[site])
    # a round is checkpointed when its training ends (its line waits for the next round's replies);
    # 6 rounds: one message per site and round leaves the restarted site time to rejoin
    fed.start_run(f"{RUN} num-server-rounds=6 output-dir='{runs}' run-name='drop' dp='sample' "
                  "min-train-sites=1 round-timeout=30.0")
    run_dir = runs / "drop"
    fed.wait_for(lambda: (run_dir / "checkpoints" / "round-1.pt").is_file(), 240, "round 1")
    fed.wait_for(lambda: fed.log_of("site-b").count("Receiving: train message") >= 2, 120,
                 "site-b to receive its round-2 training message")
    fed.kill("site-b")  # mid-round: its round-2 message is lost with it
    killed = time.monotonic()
    fed.wait_for(lambda: (run_dir / "checkpoints" / "round-2.pt").is_file(), 240,
                 "round 2 to complete without site-b")
    round2_s = time.monotonic() - killed
    rejoin_s = fed.restart_supernode("site-b", keys["site-b"], study / "site-b", state["site-b"])
    fed.wait_for(lambda: (run_dir / "summary.json").is_file(), 400, "the run to finish")
    rounds = read_rounds(run_dir)
    assert sorted(rounds[0]["train"]) == ["site-a", "site-b"]
    assert list(rounds[1]["train"]) == ["site-a"] and "no reply" in rounds[1]["errors"]["site-b"]
    assert all("site-a" in r["train"] for r in rounds)  # the run never stopped
    assert sorted(rounds[-1]["train"]) == ["site-a", "site-b"]  # rejoined with its own node identity
    ledger = json.loads((state["site-b"] / "privacy_ledger.json").read_text())
    trained = [r["round"] for r in rounds if "site-b" in r["train"]]
    recorded = [r["round"] for r in ledger["rounds"]]
    assert set(trained) <= set(recorded)  # the ledger survived the crash
    # a round it trained whose reply came too late stays in its ledger: the privacy was spent
    late = [r["round"] for r in rounds if "no reply" in r["errors"].get("site-b", "")]
    assert set(recorded) - set(trained) <= set(late) and recorded == sorted(recorded)
    eps = [r["epsilon"] for r in ledger["rounds"]]
    assert eps == sorted(eps) and rounds[-1]["train"]["site-b"]["epsilon"] == pytest.approx(eps[-1])
    saved_round = torch.load(local_layers_file(state["site-b"], run_dir), weights_only=True)["round"]
    assert saved_round == rounds[-1]["round"]  # its local layers kept training where they left off
    print(f"round 2 completed {round2_s:.1f}s after site-b was killed (round-timeout 30s); "
          f"site-b was re-admitted {rejoin_s:.1f}s after it restarted")
