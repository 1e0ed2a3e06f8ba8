"""Federated Mask R-CNN end to end in Flower's simulation engine: instance metrics in the output
contract, only shared tensors crossing, DP ledger, transfer learning and site inference."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fedseg.client.audit import OUTBOX_FILE
from fedseg.client.privacy import LEDGER_FILE
from fedseg.common.models import UNSEEN_PREFIX, ModelSpec, build_model, local_keys
from fedseg.common.cli import main
from fedseg.simulations.simulate import simulate
from tests.conftest import read_rounds, tiny_config

SIZE = 48
SITES = ["site-a", "site-b"]


def _spec():
    return ModelSpec(2, 1, 2, (8, 16), "group", "maskrcnn", "slim", SIZE)


@pytest.fixture(scope="module")
def dp_run(study_instance, tmp_path_factory):
    out = tmp_path_factory.mktemp("instance-runs")
    torch.manual_seed(11)
    torch.save(build_model(_spec()).state_dict(), out / "pretrained.pt")  # a lab's earlier model
    cfg = tiny_config(study_instance, out, run_name="maskrcnn", model="maskrcnn", norm="group",
                      patch_size=SIZE, lr=0.01, local_layers="norm", heldout_sites=("site-c",),
                      dp="sample", dp_noise_multiplier=1.0, dp_max_grad_norm=5.0,
                      pretrained_weights=str(out / "pretrained.pt"))
    return simulate(cfg, num_cpus=2)


def test_instance_metrics_reach_rounds_and_summary(dp_run):
    rounds = read_rounds(dp_run)
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(record["train"]) == SITES and sorted(record["eval"]) == SITES + ["site-c"]
        for site, scores in record["eval"].items():
            for key in ("pq", "aji", "ap50", "dice"):
                assert 0.0 <= scores[key] <= 1.0, (site, key, scores[key])
            assert scores["instances-true"] > 0
        assert all(m["epsilon"] > 0 for m in record["train"].values())
    summary = json.loads((dp_run / "summary.json").read_text())
    assert set(summary["instance"]) == {"sites", "heldout"}
    assert set(summary["instance"]["sites"]) <= {"pq", "aji", "ap50"} and summary["instance"]["heldout"]
    assert summary["record_level_dp"]["epsilon"].keys() == set(SITES)
    info = json.loads((dp_run / "run.json").read_text())
    assert info["model"]["model"] == "maskrcnn"
    assert info["pretrained"]["loaded"] == len(build_model(_spec()).state_dict())


def test_only_shared_tensors_leave_a_site(dp_run):
    model = build_model(_spec())
    local = local_keys(model, _spec(), "norm")
    shared = set(model.state_dict()) - local
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)
             for p in ("weight", "bias")}
    assert local == norms  # FedBN for Mask R-CNN: the GroupNorm affines stay home
    unseen = {UNSEEN_PREFIX + k for k in norms}  # their copy for the unseen-site set
    for site in SITES + ["site-c"]:
        for reply in map(json.loads, (dp_run / "site-state" / site / OUTBOX_FILE).read_text().splitlines()):
            for record in reply["records"].values():
                if record["kind"] == "arrays":
                    assert set(record["items"]) == shared | unseen
                    assert all(tuple(i["shape"])[-2:] != (SIZE, SIZE) for i in record["items"].values())
                else:
                    assert all(isinstance(v, (int, float, str)) or (isinstance(v, list) and len(v) <= 3)
                               for v in record["items"].values())
    for site in SITES:
        assert len(json.loads((dp_run / "site-state" / site / LEDGER_FILE).read_text())["rounds"]) == 2
    assert not (dp_run / "site-state" / "site-c" / LEDGER_FILE).exists()  # held out: never trained
    saved = torch.load(dp_run / "model" / "global.pt", weights_only=True)
    assert set(saved["state_dict"]) == shared | unseen and set(saved["local_keys"]) == local


def test_predict_writes_instance_masks(dp_run, study_instance, tmp_path, capsys):
    images = study_instance / "site-c" / "images"
    assert main(["predict", str(images), str(tmp_path / "pred"), "--model", str(dp_run / "model" / "global.pt"),
                 "--state-dir", str(dp_run / "site-state" / "site-c")]) == 0
    written = sorted((tmp_path / "pred").glob("*.png"))
    assert written and len(written) == len(list(images.glob("*.png")))
    for path in written:
        mask = np.asarray(Image.open(path))
        assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint16
        ids = sorted(int(i) for i in np.unique(mask) if i > 0)
        assert ids == list(range(1, len(ids) + 1))  # instance ids 1..N
    assert str(written[0]) in capsys.readouterr().out


def test_study_compares_instance_baselines_with_pq_and_aji(study_instance, tmp_path):
    assert main(["study", str(study_instance), "--baselines", "local,pooled,fedavg", "--model", "maskrcnn",
                 "--norm", "group", "--patch-size", str(SIZE), "--rounds", "1", "--batch-size", "2",
                 "--heldout-sites", "site-c", "--output-dir", str(tmp_path), "--run-name", "s",
                 "--num-cpus", "2"]) == 0
    rows = {r["baseline"]: r for r in json.loads((tmp_path / "s" / "comparison.json").read_text())["baselines"]}
    assert set(rows) == {"local", "pooled", "fedavg"}
    for name, row in rows.items():
        for key in ("mean_pq", "mean_aji", "heldout_pq", "heldout_aji", "heldout_ap50"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert "heldout_aji" in row
