"""Shared/local split: FedBN keeps every norm tensor at the site; integer buffers never cross."""

import torch
from torch import nn

from fedseg.common.models import ModelSpec, build_model, local_keys, split_state


def _norm_keys(model: nn.Module) -> set[str]:
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.InstanceNorm2d, nn.BatchNorm2d, nn.GroupNorm)):
            keys |= {f"{name}.{k}" for k in module.state_dict()}
    return keys


def test_norm_mode_keeps_exactly_the_normalization_tensors_local():
    for norm in ("instance", "batch", "group"):
        spec = ModelSpec(2, 1, 3, (8, 16, 32), norm)
        model = build_model(spec)
        norm_keys = _norm_keys(model)
        assert norm_keys, norm
        assert local_keys(model, spec, "norm") == norm_keys


def test_none_mode_keeps_only_integer_buffers():
    spec = ModelSpec(2, 1, 2, (8, 16), "batch")
    local = local_keys(build_model(spec), spec, "none")
    assert local and all(k.endswith("num_batches_tracked") for k in local)


def test_norm_plus_head_adds_the_last_convolution():
    spec = ModelSpec(3, 1, 2, (4, 8), "instance")
    model = build_model(spec)
    extra = local_keys(model, spec, "norm+head") - local_keys(model, spec, "norm")
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)][-1]
    assert {t.shape for k, t in model.state_dict().items() if k in extra} == {
        p.shape for p in last_conv.state_dict().values()}


def test_split_state_partitions_the_state_dict():
    spec = ModelSpec(2, 3, 2, (8, 16), "instance")
    model = build_model(spec)
    local = local_keys(model, spec, "norm")
    shared, kept = split_state(model, local)
    assert set(shared) | set(kept) == set(model.state_dict())
    assert not set(shared) & set(kept)
    assert all(torch.is_floating_point(v) for v in shared.values())
