"""`fedseg study` and the report: baselines, cross-site matrix, held-out tables, browser rendering."""

import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import torch

from fedseg.client.site import sim_state_dir
from fedseg.client.site_model import saved_model
from fedseg.client.tasks import task_for
from fedseg.common.cli import main
from fedseg.common.model_kinds import ModelSpec
from fedseg.common.data import read_site, study_sites
from fedseg.common.transforms import to_dicts
from fedseg.simulations.gallery import case_view, explanation_maps
from fedseg.simulations.synth import write_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_study(root / "data", sites=4, dims=2, cases=5, size=32, shift=0.6, seed=7)
    assert main(["study", str(root / "data"), "--rounds", "2", "--heldout-sites", "site-d",
                 "--patch-size", "32", "--channels", "8,16", "--batch-size", "2",
                 "--output-dir", str(root / "out"), "--run-name", "s", "--num-cpus", "2"]) == 0
    return root / "out" / "s"


def test_study_compares_every_baseline_on_every_site(study_out):
    comparison = json.loads((study_out / "comparison.json").read_text())
    rows = {r["baseline"]: r for r in comparison["baselines"]}
    assert set(rows) == {"local", "pooled", "fedavg", "fedprox", "fedbn"}
    assert sorted(r["rank"] for r in rows.values()) == [1, 2, 3, 4, 5]
    means = [r["mean_dice"] for r in comparison["baselines"]]
    assert means == sorted(means, reverse=True)  # the ranking follows mean in-federation Dice
    for name, row in rows.items():
        for site in ("site-a", "site-b", "site-c"):
            assert 0 <= row[f"dice:{site}"] <= 1, (name, site)
        assert 0 <= row["heldout_mean_dice"] <= 1, name
        if name in ("fedavg", "fedprox", "fedbn"):  # an unseen site also gets the last rounds' ensemble
            assert 0 <= row["heldout_ensemble_dice"] <= 1 and 0 <= row["heldout_adapted_dice"] <= 1, name
        else:
            assert row["heldout_ensemble_dice"] is None, name
    assert (study_out / "comparison.csv").read_text().startswith("baseline,mean_dice")


def test_cross_site_matrix_has_one_row_per_training_site_and_one_column_per_site(study_out):
    cross = json.loads((study_out / "cross_site.json").read_text())
    assert cross["trained_at"] == ["site-a", "site-b", "site-c"]
    assert cross["scored_at"] == ["site-a", "site-b", "site-c", "site-d"]
    assert np.array(cross["dice"], dtype=float).shape == (3, 4)
    local = json.loads((study_out / "comparison.json").read_text())["baselines"]
    row = next(r for r in local if r["baseline"] == "local")
    assert [row[f"dice:{s}"] for s in cross["trained_at"]] == [cross["dice"][i][i] for i in range(3)]
    # an unseen site has no local model of its own: it is scored by every site's, averaged
    assert row["dice:site-d"] == pytest.approx(np.mean([cross["dice"][i][3] for i in range(3)]))


def test_federated_runs_report_heldout_scores_with_norm_adaptation(study_out):
    summary = json.loads((study_out / "runs" / "fedbn" / "summary.json").read_text())
    assert set(summary["heldout"]) == {"site-d"}
    assert "tta-dice" in summary["heldout"]["site-d"] and "tta-dice" not in summary["sites"]["site-a"]
    # the study asks for the last 3 rounds' ensemble; after 2 rounds the held-out site averaged 2
    assert summary["heldout"]["site-d"]["ensemble-models"] == 2
    assert 0 <= summary["heldout"]["site-d"]["ensemble-dice"] <= 1
    assert not any(k.startswith("ensemble-") for k in summary["sites"]["site-a"])
    report = (study_out / "runs" / "fedbn" / "report.html").read_text()
    assert "ensemble of the last 2 rounds" in report


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (.ci/run installs it)")
def test_report_renders_in_a_real_browser(study_out, tmp_path):
    run = study_out / "runs" / "fedbn"
    for page in (run / "report.html", study_out / "study.html"):
        dom = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'p'}", "--dump-dom",
                              page.as_uri()], capture_output=True, text=True, timeout=120).stdout
        assert dom.count("<table") >= 1 and 'src="data:image/png;base64,' in dom, page
    dom = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'p'}", "--dump-dom",
                          (run / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "Held-out sites" in dom and "site-d" in dom and "Gallery" in dom
    # the per-site table names the labels as dataset.json does, HD95's unit, and the cases behind each Dice
    assert all(h in dom for h in ("Dice structure-1", "Dice structure-2", "HD95 (px)", "validation cases")), dom
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'q'}", "--window-size=1000,5000",
                    f"--screenshot={shot}", (run / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    colourful = (pixels.max(-1) - pixels.min(-1) > 60).mean()
    assert colourful > 0.02  # the embedded plots and overlays were decoded and painted


def test_gallery_explains_the_prediction_with_maps_that_are_not_blank(study_out):
    """Each figure names its maps, and the maps for a real case vary across the image: a blank map
    explains nothing (MONAI's default softmax over one score once made every occlusion map 1.0)."""
    run = study_out / "runs" / "fedbn"
    info = json.loads((run / "run.json").read_text())
    index = json.loads((run / "plots" / "gallery" / "gallery.json").read_text())
    assert index and all("occlusion" in i["caption"] and "gradient saliency" in i["caption"] for i in index)
    model, _, patch, *_ = saved_model(run / "model" / "global.pt", sim_state_dir(run / "site-state", "site-a"))
    site = read_site(study_sites(info["config"]["study-dir"])[0], seed=0)
    data = task_for(ModelSpec.from_dict(info["model"])).eval_data(site)(to_dicts(site.training)[0])
    image = data["image"][None]
    view = case_view(image, data["label"][None], torch.zeros_like(data["label"][None]), patch, 2)
    maps = explanation_maps(model, view, patch)
    assert set(maps) == {"occlusion", "gradient"}
    for name, values in maps.items():
        assert values.shape == image.shape[2:] and np.isfinite(values).all() and values.std() > 1e-6, name


def test_a_volume_is_shown_at_its_slice_with_the_most_foreground():
    image = torch.rand(1, 1, 40, 40, 40)
    label = torch.zeros(1, 1, 40, 40, 40, dtype=torch.long)
    label[..., 10:14, 12:20, 31] = 1
    label[..., 10:12, 12:14, 5] = 1
    view = case_view(image, label, label, 32, 3)
    assert view["image"].shape[2:] == (32, 32, 32)
    assert view["label"][0, 0, ..., view["slice"]].sum() == 4 * 8  # slice 31 of the volume
