"""The server's moving average of the global model: the arithmetic, and what sites evaluate."""

import pytest
import torch
from flwr.app import ArrayRecord

from fedseg.server.model_average import ModelAverage


def _record(value: float) -> ArrayRecord:
    return ArrayRecord({"w": torch.full((2,), value), "n": torch.tensor([3])})


def test_average_folds_each_round_with_its_decay_and_keeps_integers():
    average = ModelAverage(0.75)
    for value in (4.0, 0.0, 8.0):
        average.update(_record(value))
    # 4 -> 0.75 * 4 + 0.25 * 0 = 3 -> 0.75 * 3 + 0.25 * 8 = 4.25
    model = average.model(_record(8.0)).to_torch_state_dict()
    assert torch.allclose(model["w"], torch.full((2,), 4.25)) and model["n"].dtype == torch.int64


def test_no_average_is_the_aggregate_itself_and_a_resume_continues_the_average():
    plain = ModelAverage(0.0)
    plain.update(_record(4.0))
    latest = _record(1.0)
    assert plain.model(latest) is latest
    resumed = ModelAverage(0.5, start={"w": torch.full((2,), 2.0), "n": torch.tensor([3])})
    resumed.update(_record(4.0))
    assert torch.allclose(resumed.model(latest).to_torch_state_dict()["w"], torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="decay"):
        ModelAverage(1.0)
