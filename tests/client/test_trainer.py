"""Local training loop: FedProx's proximal term pulls toward the global weights; NaN stops clearly."""

import math

import pytest
import torch

from fedseg.client import site_cache, step_memory
from fedseg.client.steps import PlainStep
from fedseg.client.tasks import task_for
from fedseg.client.trainer import train_local
from fedseg.common import transforms
from fedseg.common.data import read_site, split_training
from fedseg.common.models import ModelSpec, build_model
from fedseg.simulations.synth import write_study

SPEC = ModelSpec(2, 1, 3, (8, 16), "instance")


def _drift(site, mu: float) -> float:
    torch.manual_seed(0)
    model = build_model(SPEC)
    start = {k: v.clone() for k, v in model.named_parameters()}
    train_local(model, task_for(SPEC), site, list(site.training), epochs=3, batch_size=2, lr=0.1, patch_size=32,
                seed=1, proximal_mu=mu, global_params=start)
    return sum((p.detach() - start[k]).pow(2).sum().item() for k, p in model.named_parameters())


def test_proximal_term_keeps_weights_closer_to_the_global_model(site):
    assert _drift(site, mu=10.0) < 0.5 * _drift(site, mu=0.0)


def test_training_reports_cases_not_batches(site):
    model = build_model(SPEC)
    result = train_local(model, task_for(SPEC), site, list(site.training), epochs=2, batch_size=4, lr=0.01,
                         patch_size=32, seed=0)
    assert result.num_examples == 6 and result.steps == 2 * 2  # ceil(6 / 4) steps per epoch


def test_diverging_training_stops_with_a_clear_error(site):
    model = build_model(SPEC)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="site site-a: training loss became nan"):
        train_local(model, task_for(SPEC), site, list(site.training), epochs=1, batch_size=2, lr=0.01,
                    patch_size=32, seed=0)


def test_evaluation_scores_every_label_on_whole_images(site):
    model = build_model(SPEC)
    _, val = split_training(site, 0.5, 0)
    scores = task_for(SPEC).evaluate(model, site, val, patch_size=16)
    assert {"dice-1", "dice-2", "hd95-1", "hd95-2", "dice", "hd95"} == set(scores)


def _trained(site, cache_mb: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(SPEC)
    train_local(model, task_for(SPEC), site, list(site.training), epochs=2, batch_size=2, lr=0.1,
                patch_size=32, seed=5, cache_mb=cache_mb)
    return model.state_dict()


def test_cached_cases_train_exactly_as_cases_read_from_disk_and_edited_files_are_read_again(site):
    """A later round in the same process reuses the decoded cases, with the same random patches
    as a fresh read; a label a site corrects (or any file it changes) is read again."""
    before = site_cache.cached_bytes()
    from_disk = _trained(site, cache_mb=0)
    assert site_cache.cached_bytes() == before  # cache off: nothing kept
    first = _trained(site, cache_mb=64)
    held = site_cache.cached_bytes()
    assert held > before
    again = _trained(site, cache_mb=64)  # served from the cache
    assert site_cache.cached_bytes() == held
    for k in from_disk:
        assert torch.equal(first[k], from_disk[k]) and torch.equal(again[k], from_disk[k]), k
    label = site.training[0].label
    label.write_bytes(label.read_bytes())  # same content, a new modification time
    _trained(site, cache_mb=64)
    assert site_cache.cached_bytes() > held  # a second entry, for the files as they are now


def test_compact_labels_train_exactly_as_int64_labels(tmp_path, monkeypatch):
    """Labels are decoded (and cached) in a compact integer type; the random patches, losses and
    weights are exactly those of int64 labels (MONAI's crop sampler must still tell foreground
    from background)."""
    site = read_site(write_study(tmp_path / "study", sites=1, dims=2, cases=6, size=64, seed=1)[0])
    decoded = transforms.eval_transforms(site)(transforms.to_dicts(site.training)[0])
    assert decoded["label"].element_size() <= 2

    def trained() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_model(SPEC)
        train_local(model, task_for(SPEC), site, list(site.training), epochs=4, batch_size=2, lr=0.1,
                    patch_size=16, seed=5)
        return model.state_dict()

    compact = trained()
    cast = transforms._LabelToClasses.__call__
    monkeypatch.setattr(transforms._LabelToClasses, "__call__",
                        lambda self, data: {**cast(self, data), "label": cast(self, data)["label"].long()})
    wide = trained()
    for k in compact:
        assert torch.equal(compact[k], wide[k]), k


def test_a_case_is_decoded_once_into_a_compact_form_that_drawing_augmented_patches_leaves_unchanged(tmp_path):
    """What a site keeps of a case across steps (and rounds) is the normalized image in half
    precision, a two-byte label and where its foreground and background lie; each step only crops,
    mirrors and changes the appearance of a float32 patch, never the kept case."""
    site = read_site(write_study(tmp_path / "study", sites=1, dims=2, cases=4, size=64, seed=2)[0])
    data = task_for(SPEC).training_data(site, list(site.training), 32, seed=0, augment=True, flips=(0, 1))
    kept = data.dataset._cache
    assert {k: v.dtype for k, v in kept[0].items()} == {
        "image": torch.float16, "label": torch.int16,
        "label_fg_indices": torch.int32, "label_bg_indices": torch.int32}
    before = [{k: v.clone() for k, v in item.items()} for item in kept]
    patches = [data[i % len(data)] for i in range(40)]
    assert {(tuple(p["image"].shape), p["image"].dtype) for p in patches} == {((1, 32, 32), torch.float32)}
    assert sum(bool(p["label"].any()) for p in patches) >= len(patches) // 3  # half are centred on foreground
    for item, copy in zip(kept, before):
        for k in copy:
            assert torch.equal(item[k], copy[k]), k


def test_the_cache_stays_within_its_budget(site):
    _trained(site, cache_mb=64)
    assert 0 < site_cache.cached_bytes() <= 64 * 2**20
    tiny = task_for(SPEC).training_data(site, list(site.training), 32, seed=0, cache_mb=1)
    assert len(tiny) == len(site.training)
    assert site_cache.cached_bytes() <= 1 * 2**20  # older entries dropped to fit the new budget


def test_mixed_precision_trains_in_bf16_and_keeps_float32_weights(site):
    """amp=bf16 (asked for explicitly on a CPU): the forward passes run in bfloat16, so the losses
    differ slightly from float32's, the weights stay float32 and training still lowers the loss."""
    from fedseg.common.precision import Precision

    losses = {}
    for name, precision in (("fp32", None), ("bf16", Precision("cpu", torch.bfloat16))):
        torch.manual_seed(0)
        model = build_model(SPEC)
        first = train_local(model, task_for(SPEC), site, list(site.training), epochs=1, batch_size=2, lr=0.05,
                            patch_size=32, seed=0, precision=precision).loss
        last = train_local(model, task_for(SPEC), site, list(site.training), epochs=6, batch_size=2, lr=0.05,
                           patch_size=32, seed=1, precision=precision).loss
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert last < first, name
        losses[name] = first
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_precision_follows_the_device_and_dp():
    from fedseg.common.precision import cpu_has_bf16, site_precision

    # a CPU with bf16 units trains in bf16 unless told otherwise; others in float32
    assert site_precision("auto", "cpu").dtype == (torch.bfloat16 if cpu_has_bf16() else None)
    assert site_precision("auto", "cpu", predict=True).dtype is None  # predict matches the float32 exports
    assert site_precision("bf16", "cpu").dtype == torch.bfloat16
    assert site_precision("bf16", "cpu", dp=True).dtype is None  # per-case clipping in float32
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        site_precision("fp16", "cpu")


def test_a_3d_unet_trains_channels_last_on_a_cpu_without_dp_and_is_saved_and_sent_in_the_usual_layout(tmp_path):
    from fedseg.client.trainer import training_layout

    site3d = read_site(write_study(tmp_path, sites=1, dims=3, cases=3, size=24, seed=0)[0])
    spec = ModelSpec(3, 1, 3, (4, 8), "instance")
    assert training_layout(spec, "cpu") == torch.channels_last_3d
    assert (training_layout(SPEC, "cpu") == training_layout(spec, "cuda") == training_layout(spec, "cpu", private=True)
            == torch.contiguous_format)
    torch.manual_seed(0)
    model = build_model(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, task_for(spec), site3d, list(site3d.training), epochs=1, batch_size=2, lr=0.1,
                patch_size=16, seed=0)
    state = model.state_dict()
    assert all(v.is_contiguous() for v in state.values())
    assert any(not torch.equal(state[k], before[k]) for k in before)  # it did train


def test_the_network_trains_on_plain_tensors(site):
    # a MONAI MetaTensor batch would send every layer's op through MONAI's Python hooks
    model, seen = build_model(SPEC), []
    model.register_forward_pre_hook(lambda _, args: seen.append(type(args[0])))
    train_local(model, task_for(SPEC), site, list(site.training), epochs=1, batch_size=2, lr=0.01,
                patch_size=32, seed=0)
    assert seen and set(seen) == {torch.Tensor}


def test_a_compiled_training_forward_trains_the_same_weights(site):
    def trained(compile_step: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model(SPEC)
        result = train_local(model, task_for(SPEC), site, list(site.training), epochs=2, batch_size=2, lr=0.1,
                             patch_size=32, seed=3, compile_step=compile_step)
        return result.loss, model.state_dict()

    (eager_loss, eager), (compiled_loss, compiled) = trained(False), trained(True)
    assert list(compiled) == list(eager)  # saved and sent under the network's own names
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    assert all(torch.allclose(compiled[k], eager[k], atol=1e-4) for k in eager)


def test_a_batch_over_the_step_memory_budget_trains_in_parts_to_the_same_weights(site):
    def trained(memory_mb: int) -> tuple[float, dict[str, torch.Tensor], set[int]]:
        torch.manual_seed(0)
        model, batches = build_model(SPEC), set()
        model.register_forward_pre_hook(lambda _, args: batches.add(args[0].shape[0]))
        result = train_local(model, task_for(SPEC), site, list(site.training), epochs=2, batch_size=4, lr=0.1,
                             patch_size=128, seed=3, step_memory_mb=memory_mb, proximal_mu=0.5,
                             global_params={k: v.clone() for k, v in model.named_parameters()})
        return result.loss, model.state_dict(), batches

    whole_loss, whole, whole_batches = trained(0)
    parted_loss, parted, parted_batches = trained(1)  # under one 128 px patch's activations: one per pass
    assert whole_batches == {4, 2} and parted_batches == {1}  # 6 cases: a batch of 4, then of 2
    assert parted_loss == pytest.approx(whole_loss, rel=1e-5)
    assert all(torch.allclose(parted[k], whole[k], atol=1e-5) for k in whole)


def test_each_forward_pass_keeps_no_more_activations_than_the_budget_allows(site):
    task = task_for(SPEC)
    data = task.training_data(site, list(site.training), 128, seed=0)
    patches = [data[i] for i in range(len(data))]
    model = build_model(SPEC).train()
    one, all_six = (step_memory.saved_bytes(lambda n=n: task.loss(model, patches[:n], "cpu")) for n in (1, 6))
    assert all_six == pytest.approx(6 * one, rel=0.05)  # activations grow with the patches in a pass
    budget_mb = math.floor(2.5 * one / 2**20)  # room for two patches' activations, not three
    step = PlainStep(task, model, "cpu", [], 0.0, memory_mb=budget_mb)
    assert [len(p) for p in step.parts(patches)] == [2, 2, 2]
    assert all(step_memory.saved_bytes(lambda p=p: task.loss(model, p, "cpu")) <= budget_mb * 2**20
               for p in step.parts(patches))
    batch_norm = task_for(ModelSpec(2, 1, 3, (8, 16), "batch"))  # statistics of the whole batch: never split
    assert PlainStep(batch_norm, model, "cpu", [], 0.0, memory_mb=budget_mb).parts(patches) == [patches]
