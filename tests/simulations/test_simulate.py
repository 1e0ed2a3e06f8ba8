"""End to end in Flower's real simulation engine: outputs, privacy boundary, determinism, resume."""

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from fedseg.client.audit import OUTBOX_FILE
from fedseg.common.config import ConfigError, RunConfig, keys
from fedseg.common.data import DataError, read_site, split_training, study_sites
from fedseg.common.models import UNSEEN_PREFIX, ModelSpec, build_model, local_keys
from fedseg.common.cli import main
from fedseg.common.plan import Fingerprint, make_plan, merge, site_fingerprint
from fedseg.server.step_timing import duration_text
from fedseg.simulations.simulate import simulate, site_cpus
from fedseg.simulations.synth import write_study
from tests.conftest import local_layers_file, read_rounds, tiny_config


def _local_layers(run_dir: Path, site: str) -> dict:
    return torch.load(local_layers_file(run_dir / "site-state" / site, run_dir), weights_only=True)


def _outbox(run_dir: Path, site: str) -> list[dict]:
    path = run_dir / "site-state" / site / OUTBOX_FILE
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def fedbn_run(study_2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return simulate(tiny_config(study_2d, out, run_name="fedbn"), num_cpus=2)


def test_run_folder_holds_the_output_contract(fedbn_run, study_2d):
    for name in ("run.json", "rounds.jsonl", "summary.json", "model/global.pt",
                 "checkpoints/round-1.pt", "checkpoints/round-2.pt"):
        assert (fedbn_run / name).is_file(), name
    rounds = read_rounds(fedbn_run)
    sites = ["site-a", "site-b", "site-c"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(record["train"]) == sites and sorted(record["eval"]) == sites
        for site in sites:
            n_train = len(split_training(read_site(study_2d / site, seed=3), 0.25, 3)[0])
            assert record["train"][site]["num-examples"] == n_train  # cases, not batches
            assert 0.0 <= record["eval"][site]["dice"] <= 1.0
            assert {"dice-1", "dice-2", "hd95-1", "hd95-2"} <= set(record["eval"][site])
    summary = json.loads((fedbn_run / "summary.json").read_text())
    final = {s: rounds[-1]["eval"][s]["dice"] for s in sites}
    assert summary["in_federation"]["mean"] == pytest.approx(sum(final.values()) / 3)
    assert summary["in_federation"]["worst_site"] == min(final, key=final.get)
    assert summary["in_federation"]["gap"] == pytest.approx(max(final.values()) - min(final.values()))
    info = json.loads((fedbn_run / "run.json").read_text())
    assert info["config"]["local-layers"] == "norm" and info["ended"] and info["versions"]["flwr"]


def test_fedbn_norm_layers_never_leave_a_site(fedbn_run):
    """FedBN: each site's norms stay with it; a copy of them, under the unseen-site prefix, is
    averaged by the server into the set only sites that never trained receive."""
    spec = ModelSpec(2, 1, 3, (8, 16), "instance")
    model = build_model(spec)
    local = local_keys(model, spec, "norm")
    shared_keys = set(model.state_dict()) - local
    unseen_keys = {UNSEEN_PREFIX + k for k in local if model.state_dict()[k].is_floating_point()}
    sent_keys = shared_keys | unseen_keys
    float32_bytes = sum(v.numel() * 4 for k, v in model.state_dict().items() if k in shared_keys)
    float32_bytes += sum(model.state_dict()[k[len(UNSEEN_PREFIX):]].numel() * 4 for k in unseen_keys)
    image_shapes = {(32, 32), (1, 32, 32)}
    for site in ("site-a", "site-b", "site-c"):
        replies = _outbox(fedbn_run, site)
        trains = [r for r in replies if r["type"] == "train"]
        assert len(trains) == 2 and {r["type"] for r in replies} == {"query", "train", "evaluate"}
        timed = [r for r in replies if "seconds-per-step" in r["records"].get("config", {}).get("items", {})]
        assert len(timed) == 1 and list(timed[0]["records"]["config"]["items"]) == ["seconds-per-step"]
        for reply in replies:
            assert not any(k.startswith(UNSEEN_PREFIX) for k in reply["received"].get("arrays", []))
            for record in reply["records"].values():
                if record["kind"] == "arrays":
                    keys = set(record["items"])
                    assert keys == sent_keys and not keys & local
                    assert all(tuple(i["shape"]) not in image_shapes for i in record["items"].values())
                    sent = sum(i["bytes"] for i in record["items"].values())
                    # float32 payload plus one .npy header (128 bytes) per tensor, nothing else
                    assert float32_bytes <= sent <= float32_bytes + 128 * len(keys)
                else:  # metrics and config: scalars or short lists of label names only
                    for value in record["items"].values():
                        assert isinstance(value, (int, float, str)) or (
                            isinstance(value, list) and len(value) <= 3), value
        saved = _local_layers(fedbn_run, site)
        assert set(saved["tensors"]) == local and saved["round"] == 2
    a, b = (_local_layers(fedbn_run, s)["tensors"] for s in ("site-a", "site-b"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # each site learned its own norms
    global_model = torch.load(fedbn_run / "model" / "global.pt", weights_only=True)
    assert set(global_model["state_dict"]) == sent_keys
    assert set(global_model["local_keys"]) == local
    assert global_model["flip_axes"] == [0, 1]  # 2D synthetic blobs have no orientation: mirrored
    assert "patches mirrored along axes 0, 1" in (fedbn_run / "report.html").read_text()


def test_same_seed_same_metrics_and_resume_continues_exactly(fedbn_run, study_2d, tmp_path):
    again = simulate(tiny_config(study_2d, tmp_path, run_name="again"), num_cpus=2)
    first, second = read_rounds(fedbn_run), read_rounds(again)
    for r1, r2 in zip(first, second, strict=True):
        assert r1["train"] == r2["train"] and r1["eval"] == r2["eval"]
    # stop after round 1, then resume to round 2 from the checkpoint and the sites' state
    half = simulate(tiny_config(study_2d, tmp_path, run_name="half", num_server_rounds=1), num_cpus=2)
    assert [r["round"] for r in read_rounds(half)] == [1]
    # a 2-round run's sites score round 1's model inside round 2's train message; a 1-round run
    # scores it in evaluation messages: the same scores, with one message per site and round
    assert read_rounds(half)[0]["eval"].keys() == first[0]["eval"].keys() == {"site-a", "site-b", "site-c"}
    for site, scores in read_rounds(half)[0]["eval"].items():
        assert first[0]["eval"][site] == pytest.approx(scores, rel=1e-5), site
    assert not any(k.startswith("eval/") for m in first[0]["train"].values() for k in m)
    for site in ("site-a", "site-b", "site-c"):
        kinds = [r["type"] for r in _outbox(fedbn_run, site)]
        assert kinds.count("train") == 2 and kinds.count("evaluate") == 1, kinds
    assert main(["simulate", "--resume-run", str(half), "--rounds", "2", "--num-cpus", "2"]) == 0
    resumed = read_rounds(half)
    assert [r["round"] for r in resumed] == [1, 2]
    assert resumed[1]["train"] == first[1]["train"] and resumed[1]["eval"] == first[1]["eval"]
    assert json.loads((half / "run.json").read_text())["resumed_from_round"] == 1


def test_split_site_is_a_simulate_flag_that_a_resume_keeps(tmp_path, capsys):
    study = tmp_path / "one-site"
    write_study(study, sites=1, dims=2, cases=12, size=32, seed=2)
    flags = ["--local-epochs", "1", "--batch-size", "2", "--patch-size", "32", "--channels", "8,16",
             "--output-dir", str(tmp_path / "runs"), "--run-name", "split", "--num-cpus", "2"]
    assert main(["simulate", str(study), "--split-site", "3", "--rounds", "1", *flags]) == 0
    run_dir = tmp_path / "runs" / "split"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["split_site"] == 3 and "split-site" not in info["config"]
    assert sorted(info["training_sites"]) == ["site-a#0", "site-a#1", "site-a#2"]
    with pytest.raises(ConfigError, match="unknown run-config key 'split-site'"):
        RunConfig.from_dict({"split-site": 3})
    capsys.readouterr()
    assert main(["simulate", "--resume-run", str(run_dir), "--split-site", "2", "--rounds", "2"]) == 2
    assert "keeps its split" in capsys.readouterr().err
    assert main(["simulate", "--resume-run", str(run_dir), "--rounds", "2", "--num-cpus", "2"]) == 0
    (_, second) = read_rounds(run_dir)
    assert sorted(second["train"]) == ["site-a#0", "site-a#1", "site-a#2"]


def test_3d_nifti_study_with_fedprox(study_3d, tmp_path):
    cfg = tiny_config(study_3d, tmp_path, num_server_rounds=1, patch_size=16, channels=(4, 8),
                      strategy="fedprox", proximal_mu=0.1, local_layers="none")
    run_dir = simulate(cfg, num_cpus=2)
    (record,) = read_rounds(run_dir)
    assert sorted(record["eval"]) == ["site-a", "site-b"]
    for scores in record["eval"].values():  # every site has foreground and a prediction to measure
        assert 0.0 <= scores["dice"] <= 1.0 and scores["hd95"] >= 0.0, scores
    info = json.loads((run_dir / "run.json").read_text())
    assert info["model"]["spatial_dims"] == 3
    # the sites' fingerprints came through discovery and plan what the sites' pooled cases plan
    pooled = merge([site_fingerprint(read_site(ref)) for ref in study_sites(study_3d)])
    saved = json.loads((run_dir / "plan.json").read_text())
    assert Fingerprint.from_json(saved["fingerprint"]) == pooled
    assert saved["configurations"] == {k: p.to_json() for k, p in make_plan(pooled).items()}
    assert "merged dataset fingerprints (plan.json" in (run_dir / "report.html").read_text()
    assert all("fingerprint" not in site for site in info["sites"].values())  # run.json keeps the shape only


def test_model_auto_trains_predicts_and_exports_the_network_and_grid_planned_from_the_sites_fingerprints(
        study_3d, tmp_path):
    import nibabel as nib

    from fedseg.client.site import sim_state_dir
    from fedseg.client.site_model import saved_model
    from fedseg.simulations.pooled import pooled_network

    cfg = tiny_config(study_3d, tmp_path, model="auto", num_server_rounds=1, local_layers="norm+head")
    run_dir = simulate(cfg, num_cpus=2)
    (record,) = read_rounds(run_dir)
    assert all(0.0 <= s["dice"] <= 1.0 for s in record["eval"].values())
    assert "this run trains its 3d configuration" in (run_dir / "report.html").read_text()
    planned = json.loads((run_dir / "plan.json").read_text())["configurations"]["3d"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["model"]["model"] == "dynunet" and info["patch_size"] == planned["patch_size"]
    assert (info["model"]["channels"], info["model"]["kernels"], info["model"]["strides"]) == (
        planned["features"], planned["kernels"], planned["strides"])
    # the two sites' voxels differ in size: both resample to the plan's spacing, and say so
    assert info["spacing"] == planned["spacing"] and info["spacing"] != [1.0, 1.0, 1.0]
    assert f"resamples its images to {'x'.join(f'{v:.2f}' for v in planned['spacing'])} mm" in (
        run_dir / "report.html").read_text()
    # the saved model rebuilds the same network, with the site's own head and norms
    state = sim_state_dir(run_dir / "site-state", "site-a")
    model, spec, patch, *_ = saved_model(run_dir / "model" / "global.pt", state)
    assert spec.to_dict() == info["model"] and list(patch) == planned["patch_size"]
    assert list(saved_model(run_dir / "model" / "global.pt", state).spacing) == planned["spacing"]
    # the pooled baseline plans the same network and grid from the same cases
    assert pooled_network(cfg, [read_site(ref) for ref in study_sites(study_3d)]) == (
        spec, patch, tuple(planned["spacing"]))
    site = study_3d / "site-a"
    assert main(["predict", str(site / "images"), str(tmp_path / "out"), "--model", str(run_dir / "model" / "global.pt"),
                 "--state-dir", str(state)]) == 0
    image = nib.load(sorted((site / "images").iterdir())[0])
    written = nib.load(tmp_path / "out" / sorted((site / "images").iterdir())[0].name)
    assert written.shape == image.shape[:3] and (written.affine == image.affine).all()
    assert main(["export", str(run_dir / "model" / "global.pt"), "--format", "monai-bundle",
                 "--output", str(tmp_path / "bundle")]) == 0
    bundle = json.loads((tmp_path / "bundle" / "configs" / "inference.json").read_text())
    assert bundle["network_def"]["_target_"] == "DynUNet" and bundle["inferer"]["roi_size"] == planned["patch_size"]
    steps = [t["_target_"] for part in ("preprocessing", "postprocessing") for t in bundle[part]["transforms"]]
    assert "Spacingd" in steps and "Invertd" in steps  # on the run's grid, written back in the image's own
    # a resume trains the network its plan.json describes, as it was
    assert main(["simulate", "--resume-run", str(run_dir), "--rounds", "2", "--num-cpus", "2"]) == 0
    assert [r["round"] for r in read_rounds(run_dir)] == [1, 2]
    resumed = torch.load(run_dir / "checkpoints" / "round-2.pt", weights_only=True)
    assert resumed["model"] == info["model"] and list(resumed["patch_size"]) == planned["patch_size"]


def test_fedadam_with_a_heldout_site(study_2d, tmp_path):
    cfg = tiny_config(study_2d, tmp_path, num_server_rounds=1, strategy="fedadam",
                      heldout_sites=("site-c",))
    run_dir = simulate(cfg, num_cpus=2)
    (record,) = read_rounds(run_dir)
    assert sorted(record["train"]) == ["site-a", "site-b"]  # the held-out site never trains
    assert sorted(record["eval"]) == ["site-a", "site-b", "site-c"]
    # FedBN: only the site that never trains receives the unseen-site norm set, and uses it
    (heldout_eval,) = [r for r in _outbox(run_dir, "site-c") if r["type"] == "evaluate"]
    assert any(k.startswith(UNSEEN_PREFIX) for k in heldout_eval["received"]["arrays"])
    for site in ("site-a", "site-b"):
        assert not any(k.startswith(UNSEEN_PREFIX) for r in _outbox(run_dir, site)
                       for k in r["received"].get("arrays", []))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["heldout"]) == {"site-c"} and set(summary["sites"]) == {"site-a", "site-b"}
    # before round 1 the training sites (not the held-out one) timed their steps: a round's
    # training on 2 cores, the two sites side by side, is expected to take the slower site's time
    expected = json.loads((run_dir / "run.json").read_text())["expected"]
    assert sorted(expected["seconds_per_step"]) == ["site-a", "site-b"] and expected["sites_at_once"] == 2
    for site, seconds in expected["seconds_per_step"].items():
        assert 0 < seconds < 10
        assert expected["steps_per_round"][site] == record["train"][site]["steps"]
        assert expected["site_round_seconds"][site] == pytest.approx(seconds * record["train"][site]["steps"])
    assert expected["round_seconds"] == pytest.approx(max(expected["site_round_seconds"].values()))
    assert expected["run_seconds"] == pytest.approx(expected["round_seconds"])  # 1 round
    assert (f"Expected training time before round 1: {duration_text(expected['round_seconds'])} per round, "
            "from 2 site(s)" in (run_dir / "report.html").read_text())


def test_evaluate_every_k_rounds_and_heldout_adaptation_in_the_last_round(study_2d, tmp_path, caplog):
    """evaluate-every 2 over 3 rounds scores rounds 2 and 3 only (the last always); the held-out
    site adapts its norms and scores again in the last round only; every site's timings are kept
    apart from its scores; the report's gallery of the final model is drawn while the sites score
    it, one best and one worst case per site."""
    cfg = tiny_config(study_2d, tmp_path, num_server_rounds=3, evaluate_every=2, heldout_sites=("site-c",))
    logger = logging.getLogger("fedseg")
    logger.addHandler(caplog.handler)  # the CLI's logging setup stops fedseg's records at its own handler
    try:
        with caplog.at_level(logging.INFO, logger="fedseg"):
            run_dir = simulate(cfg, num_cpus=2)
    finally:
        logger.removeHandler(caplog.handler)
    assert caplog.text.index("while the sites score the final model") < caplog.text.index("round 3/3 done")
    gallery = json.loads((run_dir / "plots" / "gallery" / "gallery.json").read_text())
    assert [g["title"].split(":")[0] for g in gallery] == ["site-a", "site-a", "site-b", "site-b", "site-c", "site-c"]
    assert "Gallery" in (run_dir / "report.html").read_text()
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["eval"] == {}  # trained, checkpointed and logged, not scored
    assert (run_dir / "checkpoints" / "round-1.pt").is_file()
    for r in rounds[1:]:
        assert sorted(r["eval"]) == ["site-a", "site-b", "site-c"]
    assert "tta-dice" not in rounds[1]["eval"]["site-c"] and 0 <= rounds[2]["eval"]["site-c"]["tta-dice"] <= 1
    held_out = [r for r in _outbox(run_dir, "site-c") if r["type"] == "evaluate"]
    assert len(held_out) == 2  # rounds 2 and 3
    for site in ("site-a", "site-b"):
        assert rounds[0]["time"][site]["train"] >= rounds[0]["time"][site]["data"] > 0
        assert "score" not in rounds[0]["time"][site] and rounds[1]["time"][site]["score"] > 0
        assert not any(k.startswith("seconds-") for r in rounds for k in r["train"].get(site, {}))
    assert rounds[2]["time"]["site-c"]["adapt"] > 0 and "adapt" not in rounds[1]["time"]["site-c"]
    assert not any(k.startswith("seconds-") for r in rounds for e in r["eval"].values() for k in e)
    assert all(r["seconds-checkpoint"] >= 0 for r in rounds)
    assert "3 round(s), scored every 2 rounds and the last" in (run_dir / "report.html").read_text()


def test_fewer_training_sites_than_cores_share_the_cores_out_as_threads(study_2d, tmp_path):
    """2 training sites on 4 CPUs train side by side on 2 PyTorch threads each; up to twice as
    many sites as cores all run at once (Flower's pool holds cores / share processes), more take
    turns on one core each. --sites-at-once 1: one site process at a time, on every core."""
    cfg = tiny_config(study_2d, tmp_path, num_server_rounds=1, heldout_sites=("site-c",))
    (record,) = read_rounds(simulate(cfg, num_cpus=4))
    assert {site: m["threads"] for site, m in record["train"].items()} == {"site-a": 2, "site-b": 2}
    assert site_cpus(2, 2) == 1.0  # on 2 CPUs the same sites train side by side on one thread each...
    turns = simulate(cfg.replace(run_name="one-at-a-time"), num_cpus=2, sites_at_once=1)
    (record,) = read_rounds(turns)
    assert {site: m["threads"] for site, m in record["train"].items()} == {"site-a": 2, "site-b": 2}  # ...or in turns
    expected = json.loads((turns / "run.json").read_text())["expected"]  # a round expects the sites in turns
    assert expected["sites_at_once"] == 1
    assert expected["round_seconds"] == pytest.approx(sum(expected["site_round_seconds"].values()))
    at_once = {(cores, sites): int(cores / site_cpus(cores, sites)) for cores, sites in
               ((2, 3), (4, 6), (2, 4), (2, 5), (16, 3))}
    assert at_once == {(2, 3): 3, (4, 6): 6, (2, 4): 2, (2, 5): 2, (16, 3): 3}
    chosen = {(cores, sites, n): int(cores / site_cpus(cores, sites, n)) for cores, sites, n in
              ((2, 4, 1), (2, 4, 3), (2, 4, 9), (16, 3, 2))}
    assert chosen == {(2, 4, 1): 1, (2, 4, 3): 3, (2, 4, 9): 4, (16, 3, 2): 2}
    with pytest.raises(ConfigError, match="--sites-at-once -1"):
        simulate(cfg, num_cpus=2, sites_at_once=-1)


def test_half_precision_transfer_and_the_heldout_ensemble(fedbn_run, study_2d, tmp_path):
    """transfer-dtype=float16 halves the bytes both ways while the server keeps float32 weights;
    with heldout-ensemble the held-out site alone receives the earlier round's model and scores
    the ensemble."""
    cfg = tiny_config(study_2d, tmp_path, heldout_sites=("site-c",), heldout_ensemble=2,
                      transfer_dtype="float16")
    run_dir = simulate(cfg, num_cpus=2)
    half, full = read_rounds(run_dir)[-1], read_rounds(fedbn_run)[-1]
    saved = torch.load(run_dir / "model" / "global.pt", weights_only=True)["state_dict"]
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    # every floating-point value sent (shared weights + the unseen-site norm set) costs 2 bytes, not 4
    up = sum(v.numel() for v in saved.values() if v.is_floating_point())
    down = sum(v.numel() for k, v in saved.items()
               if v.is_floating_point() and not k.startswith(UNSEEN_PREFIX))
    for site in ("site-a", "site-b"):
        assert full["train"][site]["bytes-up"] - half["train"][site]["bytes-up"] == 2 * up
        assert full["bytes-down"][site] - half["bytes-down"][site] == 2 * down
    evaluations = [r for r in _outbox(run_dir, "site-c") if r["type"] == "evaluate"]
    assert not any(k.startswith("ensemble-") for k in evaluations[0]["received"]["arrays"])
    assert any(k.startswith("ensemble-1/") for k in evaluations[1]["received"]["arrays"])
    for site in ("site-a", "site-b"):  # training sites get neither earlier models nor the norm set
        assert not any(k.startswith(("ensemble-", UNSEEN_PREFIX)) for r in _outbox(run_dir, site)
                       for k in r["received"].get("arrays", []))
    heldout = json.loads((run_dir / "summary.json").read_text())["heldout"]["site-c"]
    assert heldout["ensemble-models"] == 2 and 0 <= heldout["ensemble-dice"] <= 1


def test_a_broken_site_is_refused_before_training(study_2d, tmp_path, capsys):
    import shutil

    study = tmp_path / "broken"
    shutil.copytree(study_2d, study)
    (study / "site-b" / "labels" / "case001.png").unlink()
    with pytest.raises(DataError, match="site-b/labels/case001.png: missing file"):
        simulate(tiny_config(study, tmp_path / "out"), num_cpus=2)
    assert main(["simulate", str(study), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "case001.png: missing file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_too_few_training_sites_is_refused_before_round_1(study_2d, tmp_path, capsys):
    assert main(["simulate", str(study_2d), "--heldout-sites", "site-b,site-c", "--output-dir",
                 str(tmp_path), "--num-cpus", "2"]) == 2
    assert "'min-train-sites' = 2 but only 1 training site(s)" in capsys.readouterr().err


def test_every_run_config_key_is_a_simulate_flag(study_2d, capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    help_text = capsys.readouterr().out
    for key in keys():
        if key not in ("study-dir", "resume"):  # positional STUDY_DIR and --resume-run instead
            assert f"--{key}" in help_text, key
    assert main(["simulate", str(study_2d), "--strategy", "fedsgd"]) == 2
    assert "'strategy'" in capsys.readouterr().err


def test_run_files_follow_the_umask_and_site_state_is_owner_only(fedbn_run):
    """Colleagues in the run folder's group can open the report; a site's ledger and local layers
    are readable by no other account."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.html", "summary.json", "run.json", "model/global.pt", "checkpoints/round-1.pt"):
        assert stat.S_IMODE((fedbn_run / name).stat().st_mode) == 0o666 & ~umask, name
    for site in ("site-a", "site-b", "site-c"):
        assert stat.S_IMODE((fedbn_run / "site-state" / site).stat().st_mode) == 0o700


def test_a_full_disk_at_the_coordinator_and_a_torn_line_resume_to_the_same_rounds(fedbn_run, study_2d, tmp_path,
                                                                                   monkeypatch, caplog):
    from fedseg.server import checkpoints

    logger = logging.getLogger("fedseg")
    logger.addHandler(caplog.handler)  # the CLI's logging setup stops fedseg's records at its own handler
    save = checkpoints.atomic_torch_save

    def full_disk(path, obj):  # the run folder's disk fills up while round 2 is checkpointed
        if Path(path).name == "round-2.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save(path, obj)

    monkeypatch.setattr(checkpoints, "atomic_torch_save", full_disk)
    try:
        with pytest.raises(OSError, match="No space left on device"):
            simulate(tiny_config(study_2d, tmp_path, run_name="full"), num_cpus=2)
        assert "the run folder cannot be written ([Errno 28] No space left on device" in caplog.text
        assert "resume" in caplog.text
        run_dir = tmp_path / "full"
        assert [r["round"] for r in read_rounds(run_dir)] == [1]
        monkeypatch.setattr(checkpoints, "atomic_torch_save", save)  # space again
        assert main(["simulate", "--resume-run", str(run_dir), "--num-cpus", "2"]) == 0
        assert _same_rounds(run_dir, fedbn_run)
        # a crash (or a full disk) cut round 2's line in half: it is reported and round 2 runs again
        lines = (run_dir / "rounds.jsonl").read_text().splitlines()
        (run_dir / "rounds.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
        assert main(["simulate", "--resume-run", str(run_dir), "--num-cpus", "2"]) == 0
        assert "rounds.jsonl line 2 is damaged" in caplog.text
        assert _same_rounds(run_dir, fedbn_run)
    finally:
        logger.removeHandler(caplog.handler)


def _same_rounds(run_dir: Path, reference: Path) -> bool:
    """The same training and validation figures, round by round (times differ)."""
    got, want = read_rounds(run_dir), read_rounds(reference)
    return [(r["round"], r["train"], r["eval"]) for r in got] == [(r["round"], r["train"], r["eval"]) for r in want]


def test_a_run_killed_mid_round_resumes_to_the_same_model(study_2d, tmp_path):
    """kill -9 the whole simulation while round 2 of 3 trains (a site has already saved its
    round-2 local layers); `--resume-run` finishes it like an uninterrupted run, FedAdam's
    moments included: round 1's line is completed with the scores the resumed round 2 brings, the
    interrupted round comes out bit for bit the same, and the final model
    equal up to float32 rounding (CPU kernels may sum in another order in another Ray worker).
    One Ray CPU, so sites train in turn: from the first site's round-2 layers to the end of round
    2 there is a whole site's training and both evaluations, time enough to kill in between."""
    import os
    import signal
    import subprocess
    import sys
    import time

    flags = dict(strategy="fedadam", num_server_rounds=3, local_epochs=3)
    whole = simulate(tiny_config(study_2d, tmp_path / "whole", run_name="run", **flags), num_cpus=1)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedseg.common.cli", "simulate", str(study_2d), "--output-dir", str(out),
           "--run-name", "run", "--num-cpus", "1", "--strategy", "fedadam", "--rounds", "3",
           "--local-epochs", "3", "--batch-size", "2", "--lr", "0.05", "--patch-size", "32",
           "--channels", "8,16", "--seed", "3"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = out / "run"
    deadline = time.monotonic() + 300
    while not list((run_dir / "site-state").glob("*/runs/*/local_layers-2.pt")):
        assert proc.poll() is None and time.monotonic() < deadline, "round 2 never started"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # round 1 is checkpointed; its line waits for the scores round 2's training replies bring
    assert not (run_dir / "rounds.jsonl").exists() and (run_dir / "checkpoints" / "round-1.pt").is_file()
    assert not (run_dir / "summary.json").exists()
    assert main(["simulate", "--resume-run", str(run_dir), "--num-cpus", "1"]) == 0
    resumed, uninterrupted = read_rounds(run_dir), read_rounds(whole)
    assert [r["round"] for r in resumed] == [1, 2, 3]
    for r1, r2 in zip(resumed[:2], uninterrupted[:2]):
        assert r1["train"] == r2["train"] and r1["eval"] == r2["eval"]
    final, reference = (torch.load(d / "model" / "global.pt", weights_only=True)["state_dict"]
                        for d in (run_dir, whole))
    assert final.keys() == reference.keys()
    assert all(torch.allclose(final[k], reference[k], rtol=0, atol=1e-6) for k in final)


def test_simulation_attaches_to_a_running_ray_cluster(study_2d, tmp_path):
    """--ray-address: the virtual sites run on a Ray cluster started beforehand (a head on
    loopback here; in a larger study, several machines) instead of a private Ray instance."""
    import os
    import signal
    import socket
    import shutil
    import subprocess
    import sys
    import tempfile
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--block", f"--temp-dir={temp}",
                             "--disable-usage-stats", "--include-dashboard=false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not start"
            time.sleep(1)
        assert main(["simulate", str(study_2d), "--ray-address", f"127.0.0.1:{port}", "--num-server-rounds",
                     "1", "--patch-size", "32", "--channels", "8,16", "--batch-size", "2",
                     "--output-dir", str(tmp_path), "--run-name", "cluster"]) == 0
        assert set(read_rounds(tmp_path / "cluster")[0]["train"]) == {"site-a", "site-b", "site-c"}
        worker_logs = " ".join(p.read_text(errors="replace")
                               for p in Path(temp, "session_latest", "logs").glob("worker-*"))
        assert "fedseg site site-a round 1" in worker_logs  # the sites ran on that cluster's workers
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # this head and its workers only, not other Ray instances
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
