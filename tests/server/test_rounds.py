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
        {"train-loss": 0.5, "num-examples": 4})}))
    refused = _reply(messages["b"], Error(code=3100, reason="site b refuses: over budget"))
    recorder.trained(1, [("a", ok), ("b", refused)])  # c never answered
    recorder.evaluated(1, [("a", _reply(messages["a"], RecordDict(
        {"metrics": MetricRecord({"dice": 0.75, "num-examples": 2})})))])
    recorder.note(1, "client-level-dp", {"epsilon": 1.5})
    record = recorder.pop(1)
    assert record["round"] == 1
    assert record["train"] == {"a": {"train-loss": 0.5, "num-examples": 4, "bytes-up": record_bytes(WEIGHTS)}}
    assert record["bytes-down"] == {s: record_bytes(WEIGHTS) for s in "abc"}
    assert record["errors"] == {"b": "site b refuses: over budget",
                                "c": "no reply within round-timeout (site dropped out?)"}
    assert record["eval"] == {"a": {"dice": 0.75, "num-examples": 2}}
    assert record["client-level-dp"] == {"epsilon": 1.5}
    assert recorder.pop(1) == {"round": 1, "train": {}, "eval": {}, "errors": {}, "bytes-down": {}}


def test_round_log_checkpoints_and_appends_the_round(tmp_path):
    recorder, folder = RoundRecorder(), RunFolder(tmp_path)
    meta = {"model": {}, "local_layers": "none", "local_keys": [], "patch_size": 16,
            "run_name": "r", "run_id": "x"}
    hook = RoundLog(folder, recorder, meta, total_rounds=2)
    for rnd in (1, 2):
        recorder.evaluated(rnd, [])
        aggregate = ArrayRecord({"w": torch.full((3,), float(rnd))})
        hook(rnd, aggregate, aggregate if rnd == 1 else ArrayRecord({"w": torch.full((3,), 1.5)}))
    lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2] and all(r["seconds"] >= 0 for r in lines)
    first = torch.load(tmp_path / "checkpoints" / "round-1.pt", weights_only=True)
    assert "average_state_dict" not in first  # no average kept: the aggregate is the model
    saved = torch.load(tmp_path / "checkpoints" / "round-2.pt", weights_only=True)
    assert torch.equal(saved["state_dict"]["w"], torch.full((3,), 2.0)) and saved["run_id"] == "x"
    assert torch.equal(saved["average_state_dict"]["w"], torch.full((3,), 1.5))
