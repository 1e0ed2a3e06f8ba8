"""What crosses the wire: packed weights arrive exactly as they were sent, tensor by tensor."""

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedseg.common.models import ModelSpec, build_model
from fedseg.common.records import (MANIFEST, PACKED, is_packed, packed_record, received_state,
                                   unpacked_record, wire_record)


def _unet_state() -> dict[str, torch.Tensor]:
    model = build_model(ModelSpec(2, 1, 3, (8, 16, 32), "batch"))
    return {k: v + torch.randn_like(v) if v.is_floating_point() else v + 3 for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_packed_weights_are_one_array_per_dtype_and_unpack_to_the_same_tensors(dtype):
    state = _unet_state()
    record = wire_record(state, dtype)
    packed = packed_record(record)
    assert sorted(packed.keys()) == sorted([MANIFEST, PACKED + dtype, PACKED + "int64"])  # BN counters: int64
    assert is_packed(packed) and not is_packed(record)
    back, plain = received_state(packed), received_state(record)
    assert list(back) == list(state)  # names and order
    for name, tensor in back.items():
        assert tensor.dtype == (torch.float32 if state[name].is_floating_point() else torch.int64)
        assert torch.equal(tensor, plain[name]), name  # bit-exact, in the precision it travelled in
    unpacked = unpacked_record(packed)
    assert list(unpacked.keys()) == list(record.keys())
    assert all(unpacked[k].numpy().tobytes() == record[k].numpy().tobytes() for k in record)
    assert unpacked_record(record) is record


def test_packed_weights_that_do_not_match_their_manifest_are_refused():
    packed = packed_record(ArrayRecord({"a": torch.ones(3), "b": torch.ones(2, 2)}))
    packed[PACKED + "float32"] = Array(torch.ones(5).numpy())  # one value short of b
    with pytest.raises(ValueError, match="'b'"):
        received_state(packed)
    packed[PACKED + "float32"] = Array(torch.ones(9).numpy())
    with pytest.raises(ValueError, match="more values"):
        received_state(packed)
