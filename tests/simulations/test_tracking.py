"""Round metrics where ML teams look: a simulated run with tracking=tensorboard,mlflow, read back
with TensorBoard's and MLflow's own readers, equal to rounds.jsonl, and a resumed run continuing
the same MLflow run."""

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedseg.common.config import ConfigError, RunConfig
from fedseg.server.tracking import round_scalars
from fedseg.common.cli import main
from fedseg.simulations.simulate import simulate
from tests.conftest import read_rounds, tiny_config


def test_every_round_reaches_tensorboard_and_mlflow_and_a_resume_continues_the_same_run(study_2d, tmp_path):
    cfg = tiny_config(study_2d, tmp_path / "runs", run_name="tracked", tracking="tensorboard,mlflow",
                      heldout_sites=("site-c",))
    run_dir = simulate(cfg, num_cpus=2)
    assert main(["simulate", "--resume-run", str(run_dir), "--rounds", "3", "--num-cpus", "2"]) == 0
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2, 3]

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fedseg").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["run-name"] == "tracked"  # the resume went on in it
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag, site, metric in [("val/site-a/dice", "site-a", "dice"), ("val/site-c/dice", "site-c", "dice"),
                              ("train/site-b/train-loss", "site-b", "train-loss")]:
        part = "eval" if tag.startswith("val") else "train"
        want = [(r["round"], pytest.approx(r[part][site][metric], rel=1e-6)) for r in rounds]
        assert [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, tag)] == want
        assert [(e.step, e.value) for e in events.Scalars(tag)] == want
    heldout = [e.value for e in events.Scalars("val/mean-heldout-sites/dice")]
    assert heldout == [pytest.approx(r["eval"]["site-c"]["dice"], rel=1e-6) for r in rounds]
    assert not any(tag.startswith("train/site-c") for tag in events.Tags()["scalars"])  # held out: never trained


def test_round_scalars_are_the_lines_finite_numbers_under_names_trackers_accept():
    record = {"round": 4, "seconds": 2.5, "errors": {"site-b": "no reply"},
              "train": {"site#1": {"train-loss": 0.5, "epsilon": 1.25, "num-examples": 8, "steps": 3}},
              "eval": {"site#1": {"dice": 0.8, "hd95": float("nan"), "group-dice:F": 0.7, "group-cases:F": 5.0,
                                  "num-examples": 2},
                       "site-h": {"dice": 0.6}}}
    assert round_scalars(record, {"site-h"}) == {
        "round/seconds": 2.5, "train/site_1/train-loss": 0.5, "train/site_1/epsilon": 1.25,
        "val/site_1/dice": 0.8, "val/site_1/group-dice:F": 0.7, "val/site-h/dice": 0.6,
        "val/mean-training-sites/dice": 0.8, "val/mean-heldout-sites/dice": 0.6}


def test_an_unknown_tracker_is_refused_by_name():
    with pytest.raises(ConfigError, match="run-config 'tracking' = 'tensorboard,wandb': must be empty or"):
        RunConfig(tracking="tensorboard,wandb")
