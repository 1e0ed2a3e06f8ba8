"""Round bookkeeping: what each site reported, silent sites, and the round-end hook's outputs."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedseg.common.records import record_bytes
from fedseg.server.rounds import RoundLog, RoundRecorder
from fedseg.server.run_folder import RunFolder

pytestmark = pytest.mark.usefixtures("server_identity")

WEIGHTS = ArrayRecord({"w": torch.zeros(10)})  # 40 bytes of float32 + the .npy header


def _sent(node: int) -> Message:
    return Message(RecordDict({"arrays": WEIGHTS, "config": ConfigRecord({"lr": 0.1})}),
                   dst_node_id=node, message_type=MessageType.TRAIN)


def _reply(to: Message, content: RecordDict | Error) -> Message:
    TaskIdentity.node_id = to.metadata.dst_node_id  # the site answers
    return Message(content, reply_to=to)


def test_recorder_keeps_scalars_bytes_errors_and_names_silent_sites():
    recorder = RoundRecorder()
    messages = {site: _sent(node) for node, site in enumerate(("a", "b", "c"), start=2)}
    for site, msg in messages.items():
        recorder.sent(1, site, msg.content)
    ok = _reply(messages["a"], RecordDict({"arrays": WEIGHTS, "metrics": MetricRecord(
        {"train-loss": 0.5, "num-examples": 4, "seconds-train": 2.0})}))
    refused = _reply(messages["b"], Error(code=3100, reason="site b refuses: over budget"))
    recorder.trained(1, [("a", ok), ("b", refused)])  # c never answered
    recorder.evaluated(1, [("a", _reply(messages["a"], RecordDict(
        {"metrics": MetricRecord({"dice": 0.75, "num-examples": 2, "seconds-score": 0.5})})))])
    recorder.note(1, "client-level-dp", {"epsilon": 1.5})
    record = recorder.pop(1)
    assert record["round"] == 1
    assert record["train"] == {"a": {"train-loss": 0.5, "num-examples": 4, "bytes-up": record_bytes(WEIGHTS)}}
    assert record["bytes-down"] == {s: record_bytes(WEIGHTS) for s in "abc"}
    assert record["errors"] == {"b": "site b refuses: over budget",
                                "c": "no reply within round-timeout (site dropped out?)"}
    assert record["eval"] == {"a": {"dice": 0.75, "num-examples": 2}}
    assert record["time"] == {"a": {"train": 2.0, "score": 0.5}}  # timings apart from what a seed repeats
    assert record["client-level-dp"] == {"epsilon": 1.5}
    assert recorder.pop(1) == {"round": 1, "train": {}, "eval": {}, "errors": {}, "bytes-down": {}, "time": {}}


def test_round_log_checkpoints_and_appends_the_round(tmp_path):
    recorder, folder = RoundRecorder(), RunFolder(tmp_path)
    meta = {"model": {}, "local_layers": "none", "local_keys": [], "patch_size": 16, "flip_axes": [], "spacing": [],
            "run_name": "r", "run_id": "x"}
    hook = RoundLog(folder, recorder, meta, total_rounds=2)
    for rnd in (1, 2):
        recorder.evaluated(rnd, [])
        aggregate = ArrayRecord({"w": torch.full((3,), float(rnd))})
        hook.ended(rnd, aggregate, aggregate if rnd == 1 else ArrayRecord({"w": torch.full((3,), 1.5)}))
    lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2] and all(r["seconds"] >= 0 for r in lines)
    first = torch.load(tmp_path / "checkpoints" / "round-1.pt", weights_only=True)
    assert "average_state_dict" not in first  # no average kept: the aggregate is the model
    saved = torch.load(tmp_path / "checkpoints" / "round-2.pt", weights_only=True)
    assert torch.equal(saved["state_dict"]["w"], torch.full((3,), 2.0)) and saved["run_id"] == "x"
    assert torch.equal(saved["average_state_dict"]["w"], torch.full((3,), 1.5))


def test_a_round_scored_next_round_is_checkpointed_first_and_a_resume_completes_its_line(tmp_path):
    """Scores inside the next round's train replies: round 1 is checkpointed with what it recorded when its training ends; a
    crash before round 2's replies (which carry round 1's scores) leaves no line, and the resumed
    run is handed round 1's record to complete."""
    from fedseg.common.config import RunConfig
    from fedseg.server.run_folder import open_run

    recorder, folder = RoundRecorder(), RunFolder(tmp_path / "run")
    folder.write_run_info({"config": RunConfig(run_name="run").to_dict(), "run_id": "x"})
    meta = {"model": {}, "local_layers": "none", "local_keys": [], "patch_size": 16, "flip_axes": [], "spacing": [],
            "run_name": "run", "run_id": "x"}
    hook = RoundLog(folder, recorder, meta, total_rounds=3)
    message = _sent(2)
    recorder.sent(1, "a", message.content)
    recorder.trained(1, [("a", _reply(message, RecordDict({"arrays": WEIGHTS, "metrics": MetricRecord(
        {"train-loss": 0.5, "num-examples": 4})})))])
    hook.trained(1, WEIGHTS, WEIGHTS, {"random": 1})  # ... and the coordinator dies here
    assert folder.read_rounds() == []
    run = open_run(RunConfig(output_dir=str(tmp_path), run_name="run", resume=True))
    assert run.done == 1 and run.server_state == {"random": 1}
    assert run.pending_record["train"]["a"]["train-loss"] == 0.5

    resumed = RoundRecorder()
    resumed.restore(1, run.pending_record)
    again = RoundLog(folder, resumed, meta, total_rounds=3, checkpointed=1)
    resumed.evaluated(1, [("a", _reply(message, RecordDict(
        {"metrics": MetricRecord({"dice": 0.75, "num-examples": 2})})))])
    again.ended(1, None, None)  # checkpointed before the crash: only its line is written
    (line,) = folder.read_rounds()
    assert line["train"]["a"]["train-loss"] == 0.5 and line["eval"]["a"]["dice"] == 0.75
    assert open_run(RunConfig(output_dir=str(tmp_path), run_name="run", resume=True)).pending_record is None
