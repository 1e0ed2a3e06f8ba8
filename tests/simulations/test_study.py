"""`fedseg study` and the report: baselines, cross-site matrix, held-out tables, browser rendering."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedseg.common.cli import main
from fedseg.simulations.synth import write_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_study(root / "data", sites=4, dims=2, cases=5, size=32, shift=0.6, seed=7)
    assert main(["study", str(root / "data"), "--rounds", "1", "--heldout-sites", "site-d",
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
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'q'}", "--window-size=1000,5000",
                    f"--screenshot={shot}", (run / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    colourful = (pixels.max(-1) - pixels.min(-1) > 60).mean()
    assert colourful > 0.02  # the embedded plots and overlays were decoded and painted


def test_gallery_overlays_show_what_the_model_sees(study_out):
    """Each gallery figure's explanation panel (the right quarter) varies: a blank map would
    explain nothing (MONAI's default softmax over one score once made every map 1.0)."""
    gallery = study_out / "runs" / "fedbn" / "plots" / "gallery"
    index = json.loads((gallery / "gallery.json").read_text())
    assert index and all("occlusion" in item["caption"] for item in index)
    for item in index:
        assert _last_panel(Image.open(gallery / item["file"])).std(axis=(0, 1)).max() > 2, item["title"]


def _last_panel(figure: Image.Image) -> np.ndarray:
    """The pixels inside the rightmost panel of a gallery figure (white margins cut away)."""
    pixels = np.asarray(figure.convert("RGB")).astype(float)
    inked = (pixels < 245).any(-1)
    cols = np.nonzero(inked.any(0))[0]
    start = cols[np.nonzero(np.diff(cols) > 1)[0][-1] + 1]  # the last run of inked columns
    rows = np.nonzero(inked[:, start:].any(1))[0]
    return pixels[rows.min() + 3: rows.max() - 3, start + 3: cols.max() - 3]
