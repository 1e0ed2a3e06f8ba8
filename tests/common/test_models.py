"""Shared/local split: FedBN keeps every norm tensor at the site; integer buffers never cross; the
planned network (model=auto) trains every deep-supervision output and exports as MONAI's own."""

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet
from torch import nn

from fedseg.client.tasks import task_for
from fedseg.common.config import ConfigError, RunConfig
from fedseg.common.models import ModelSpec, build_model, inference_network, local_keys, split_state


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


# nnU-Net's plan of MSD Hippocampus at 1 mm (the 3d configuration, in the images' own axis order)
HIPPOCAMPUS_PLAN = {"spatial_dims": 3, "patch_size": [40, 56, 40], "features": [32, 64, 128, 256],
                    "kernels": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}


def test_model_auto_builds_the_planned_dynunet_whose_state_names_each_tensor_once():
    spec, patch = RunConfig(model="auto").network(3, 1, 3, {"3d": HIPPOCAMPUS_PLAN})
    assert patch == (40, 56, 40) and spec.model == "dynunet" and spec.deep_supervision == 1
    model = build_model(spec)
    # every tensor has one name: no second copy crosses the wire, no norm escapes the split
    assert len(model.state_dict()) == len(list(model.parameters())) + len(list(model.buffers()))
    head = local_keys(model, spec, "norm+head") - local_keys(model, spec, "norm")
    assert {k.split(".")[0] for k in head} == {"output_block", "deep_supervision_heads"}
    norms = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, nn.InstanceNorm3d)
             for k in m.state_dict()}
    assert norms and local_keys(model, spec, "norm") == norms
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="'model' = 'auto'"):
        RunConfig(model="auto").network(3, 1, 3, None)


def test_deep_supervision_trains_every_output_with_nnunets_weights_and_predicts_with_one():
    spec, patch = RunConfig(model="auto").network(3, 1, 3, {"3d": HIPPOCAMPUS_PLAN})
    torch.manual_seed(0)
    model = build_model(spec).train()
    image, label = torch.randn(1, *patch), torch.randint(0, 3, (1, *patch)).float()
    item = {"image": image, "label": label}
    loss = task_for(spec).loss(model, [item, item], "cpu")
    torch.manual_seed(0)
    outputs = build_model(spec).train()(torch.stack([image, image]))
    assert outputs.shape[1] == 2  # the output and one deep-supervision output, both full size
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = sum(w * dice_ce(outputs[:, i], torch.stack([label, label])) for i, w in enumerate((2 / 3, 1 / 3)))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert model.eval()(image[None]).shape == (1, 3, *patch)


def test_the_exported_network_is_monais_own_dynunet_with_the_same_predictions():
    spec, patch = RunConfig(model="auto").network(3, 1, 3, {"3d": HIPPOCAMPUS_PLAN})
    model = build_model(spec).eval()
    plain, plain_spec = inference_network(model, spec)
    assert type(plain) is DynUNet and plain_spec.deep_supervision == 0
    image = torch.randn(1, 1, *patch)
    assert torch.equal(plain(image), model(image))
