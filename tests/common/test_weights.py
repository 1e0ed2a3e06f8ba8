"""Transfer learning from local files: full and backbone-only state dicts, bad files."""

import pytest
import torch
from torchvision.models import resnet18

from fedseg.common.models import ModelSpec, build_model
from fedseg.common.weights import WeightsError, load_pretrained


def _maskrcnn(in_channels=3):
    return build_model(ModelSpec(2, in_channels, 2, (8, 16), "group", "maskrcnn", "slim", 64))


def test_full_state_dict_loads_every_tensor(tmp_path):
    source = _maskrcnn()
    torch.save({"state_dict": source.state_dict()}, tmp_path / "full.pt")  # nested, like a checkpoint
    target = _maskrcnn()
    report = load_pretrained(target, tmp_path / "full.pt")
    assert len(report.loaded) == len(source.state_dict()) and not report.skipped
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_backbone_only_file_maps_to_the_body_and_reports_what_it_skipped(tmp_path):
    body = resnet18(weights=None, norm_layer=lambda c: torch.nn.GroupNorm(min(32, c // 8) or 1, c))
    torch.save({f"module.{k}": v for k, v in body.state_dict().items()}, tmp_path / "r18.pt")
    model = _maskrcnn(in_channels=1)  # grayscale: the RGB stem cannot load
    report = load_pretrained(model, tmp_path / "r18.pt")
    assert "fc.weight" in report.skipped and "no tensor" in report.skipped["fc.weight"]
    assert "shape (64, 3, 7, 7)" in report.skipped["conv1.weight"]
    assert len(report.loaded) == len(body.state_dict()) - 3  # fc.weight, fc.bias, conv1.weight
    assert torch.equal(model.state_dict()["backbone.body.layer1.0.conv1.weight"],
                       body.state_dict()["layer1.0.conv1.weight"])
    assert "loaded" in report.summary() and report.to_dict()["skipped"] == 3


def test_incompatible_or_corrupt_files_fail_clearly(tmp_path):
    unet = build_model(ModelSpec(2, 1, 2, (8, 16)))
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    with pytest.raises(WeightsError, match=r"unet\.pt: none of its .* tensor\(s\) fit"):
        load_pretrained(_maskrcnn(), tmp_path / "unet.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pt: not a PyTorch weights file"):
        load_pretrained(_maskrcnn(), tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="holds no state dict"):
        load_pretrained(_maskrcnn(), tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="file not found"):
        load_pretrained(_maskrcnn(), tmp_path / "missing.pt")


def test_torchvision_maskrcnn_r50_checkpoint_loads_all_but_the_class_specific_predictors(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    coco_layout = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(coco_layout.state_dict(), tmp_path / "maskrcnn_r50_coco.pt")  # 91 COCO classes
    model = build_model(ModelSpec(2, 3, 2, (8, 16), "frozen", "maskrcnn", "resnet50", 256))
    report = load_pretrained(model, tmp_path / "maskrcnn_r50_coco.pt")
    not_loaded = set(model.state_dict()) - set(report.loaded)
    assert {k.rsplit(".", 2)[0] for k in not_loaded} == {"roi_heads.box_predictor", "roi_heads.mask_predictor"}
    assert torch.equal(model.state_dict()["backbone.fpn.layer_blocks.0.0.weight"],
                       coco_layout.state_dict()["backbone.fpn.layer_blocks.0.0.weight"])
