"""DP end to end in Flower's simulation: record-level ledger and refusals, client-level accounting."""

import json
import shutil

import pytest

from fedseg.client.site import SIM_POLICIES_FILE
from fedseg.simulations.simulate import simulate
from fedseg.simulations.synth import write_study
from tests.client.test_privacy import independent_epsilon
from tests.conftest import read_rounds, tiny_config


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpstudy")
    write_study(out, sites=2, dims=2, cases=5, size=32, shift=0.5, seed=4)  # 4 train + 1 val each
    return out


def test_record_level_dp_with_fedbn_budget_refusal_and_resume(study, tmp_path):
    run_study = tmp_path / "study"
    shutil.copytree(study, run_study)
    # epsilon is 5.38 after one round and 7.41 after two here: site-a's budget allows one round
    (run_study / SIM_POLICIES_FILE).write_text(json.dumps({"site-a": {"max-epsilon": 6.0}}))
    cfg = tiny_config(run_study, tmp_path / "runs", run_name="dp", dp="sample", num_server_rounds=1,
                      batch_size=2, dp_noise_multiplier=1.0, min_train_sites=1, local_layers="norm")
    run_dir = simulate(cfg, num_cpus=2)
    assert simulate(cfg.replace(resume=True, num_server_rounds=2), num_cpus=2) == run_dir  # a restart
    first, second = read_rounds(run_dir)
    q, steps = 2 / 4, 2  # Poisson rate b/N and ceil(N/b) steps for 4 training cases
    for site in ("site-a", "site-b"):
        assert first["train"][site]["epsilon"] == pytest.approx(independent_epsilon(q, 1.0, steps, 1e-5))
    assert "site-a" not in second["train"] and "max-epsilon 6.000" in second["errors"]["site-a"]
    assert second["train"]["site-b"]["epsilon"] == pytest.approx(independent_epsilon(q, 1.0, 2 * steps, 1e-5))
    info = json.loads((run_dir / "run.json").read_text())
    assert "expected" not in info  # no site trained a step without DP to time it
    plan = info["dp_plan"]  # the coordinator's record ...
    for site in ("site-a", "site-b"):  # ... is what each site trained with
        reported = first["train"][site]
        assert (plan[site]["noise_multiplier"], plan[site]["lr"]) == (reported["noise-multiplier"], reported["dp-lr"])
    ledger = json.loads((run_dir / "site-state" / "site-a" / "privacy_ledger.json").read_text())
    assert [r["round"] for r in ledger["rounds"]] == [1]  # the refused round spent nothing
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["record_level_dp"]["epsilon"] == {
        "site-a": first["train"]["site-a"]["epsilon"], "site-b": second["train"]["site-b"]["epsilon"]}
    outbox = [json.loads(x) for x in (run_dir / "site-state" / "site-b" / "outbox.jsonl").read_text().splitlines()]
    assert any(r["records"].get("arrays", {}).get("items") for r in outbox)  # weights were sent
    assert all(not any(k.startswith("model.") and ".adn.N." in k
                       for k in r["records"].get("arrays", {}).get("items", {}))
               for r in outbox)  # FedBN norm layers stayed home under DP too (only their copy
    # for the unseen-site set, trained under DP like every shared tensor, left)


def test_too_few_sites_left_stops_the_run_with_the_sites_reasons(study, tmp_path):
    run_study = tmp_path / "study"
    shutil.copytree(study, run_study)
    (run_study / SIM_POLICIES_FILE).write_text(json.dumps({"site-b": {"require-dp": True}}))
    cfg = tiny_config(run_study, tmp_path / "runs", num_server_rounds=1, min_train_sites=2)
    with pytest.raises(RuntimeError, match="site-b refuses: it requires record-level DP"):
        simulate(cfg, num_cpus=2)


def test_client_level_dp_is_accounted_by_flower(study, tmp_path):
    cfg = tiny_config(study, tmp_path, dp="client", dp_noise_multiplier=0.5, dp_max_grad_norm=1.0,
                      local_layers="none")
    run_dir = simulate(cfg, num_cpus=2)
    eps = [r["client-level-dp"]["epsilon"] for r in read_rounds(run_dir)]
    assert len(eps) == 2 and 0 < eps[0] < eps[1]
    assert json.loads((run_dir / "summary.json").read_text())["client_level_dp"]["epsilon"] == eps[1]
