"""Detectors by name, pruning them with the Pruner, and the three phases on detection batches."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import adasap
from adasap.data.detection import check_detection_batch
from adasap.errors import UserError
from adasap.experiments.config import from_flat
from adasap.method.base_optimizer import phase_sharpness
from adasap.method.neurons import NeuronLayout
from adasap.method.output_layers import detector_output_layers, layer_names
from adasap.method.pruner import Pruner
from adasap.method.schedule import PhaseSchedule
from adasap.models.detection import build_detector, list_detectors, unfreeze_batchnorm
from adasap.training.settings import PruneSettings

TORCHVISION_DETECTORS = [
    "ssdlite320_mobilenet_v3_large",
    "ssd300_vgg16",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
]
TINY_SSD_OUTPUTS = [
    f"head.{kind}_head.module_list.{level}"
    for kind in ("classification", "regression")
    for level in range(3)
]


def synthetic_batch(count: int = 2, size: int = 128, seed: int = 0):
    """Bright squares on a dark canvas, labelled 1 or 2 by their size."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(count):
        image = torch.rand(3, size, size, generator=generator) * 0.1
        boxes, labels = [], []
        for label, side in ((1, 24), (2, 48)):
            x, y = torch.randint(0, size - side, (2,), generator=generator).tolist()
            image[:, y : y + side, x : x + side] = 0.9
            boxes.append([x, y, x + side, y + side])
            labels.append(label)
        images.append(image)
        targets.append(
            {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
        )
    return images, targets


def head_output_shapes(model: nn.Module, images) -> list[tuple[int, ...]]:
    """The output shape of every call of every head output layer, in eval mode, less the
    first dimension (images, or Faster R-CNN's regions, whose number depends on the RPN):
    anchors x classes (or x 4) and the feature map's size."""
    shapes: list[tuple[int, ...]] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
        for m in detector_output_layers(model)
    ]
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for hook in hooks:
        hook.remove()
    assert all(set(d) == {"boxes", "scores", "labels"} for d in detections)
    assert all(d["boxes"].shape[-1] == 4 for d in detections)
    return shapes


def test_every_listed_detector_is_registered():
    assert set(TORCHVISION_DETECTORS) | {"tiny_ssd"} <= set(list_detectors())


def test_unknown_detector_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown detector 'yolo'.*tiny_ssd") as info:
        build_detector("yolo", num_classes=3)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="num_classes >= 2"):
        build_detector("tiny_ssd", num_classes=1)
    with pytest.raises(UserError, match="at least 268 px"):
        build_detector("ssd300_vgg16", num_classes=3, image_size=128)


def test_frozen_batchnorm_becomes_trainable_batchnorm_with_the_same_outputs():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3, norm_layer=FrozenBatchNorm2d).eval()
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
    unfreeze_batchnorm(net)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in net.modules())
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and all(m.weight.requires_grad for m in norms)
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)


def test_output_layers_are_found_by_name():
    model = build_detector("tiny_ssd", num_classes=3)
    assert layer_names(model, detector_output_layers(model)) == TINY_SSD_OUTPUTS
    rcnn = build_detector("fasterrcnn_mobilenet_v3_large_fpn", num_classes=3, image_size=128)
    assert layer_names(rcnn, detector_output_layers(rcnn)) == [
        "rpn.head.cls_logits",
        "rpn.head.bbox_pred",
        "roi_heads.box_predictor.cls_score",
        "roi_heads.box_predictor.bbox_pred",
    ]
    fcos = build_detector("fcos_resnet50_fpn", num_classes=3, image_size=128)
    assert layer_names(fcos, detector_output_layers(fcos)) == [
        "head.classification_head.cls_logits",
        "head.regression_head.bbox_reg",
        "head.regression_head.bbox_ctrness",
    ]
    ssdlite = build_detector("ssdlite320_mobilenet_v3_large", num_classes=3, image_size=128)
    names = layer_names(ssdlite, detector_output_layers(ssdlite))
    assert names == [
        f"head.{kind}_head.module_list.{level}.1"
        for kind in ("classification", "regression")
        for level in range(6)
    ]


def test_a_model_returning_detections_without_torchvision_heads_is_a_user_error():
    class Boxes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, images):
            return [{"boxes": self.conv(i[None]).mean((2, 3))} for i in images]

    with pytest.raises(UserError, match="none of torchvision's detection heads.*ignored_layers"):
        Pruner(Boxes(), [torch.rand(3, 16, 16)], PhaseSchedule(0, 1, 0))


def test_an_example_that_is_neither_a_batch_nor_images_is_a_user_error():
    model = build_detector("tiny_ssd", num_classes=3)
    with pytest.raises(UserError, match="not a batch tensor or a list of C x H x W"):
        Pruner(model, [torch.rand(1, 3, 64, 64)], PhaseSchedule(0, 1, 0))


@pytest.mark.parametrize(
    ("batch", "problem"),
    [
        ("images", "not \\(images, targets\\)"),
        (([torch.rand(3, 8, 8)], []), "1 images, 0 targets"),
        (
            (
                [torch.rand(3, 8, 8)],
                [{"boxes": torch.tensor([[1.0, 1, 4, 4]]), "labels": torch.tensor([0])}],
            ),
            "label 0, but 0 is the background",
        ),
        (
            (
                [torch.rand(3, 8, 8)],
                [{"boxes": torch.tensor([[4.0, 1, 4, 4]]), "labels": torch.tensor([1])}],
            ),
            "zero or negative width",
        ),
        (
            ([torch.rand(3, 8, 8)], [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([1])}]),
            "not one per box",
        ),
    ],
)
def test_a_bad_detection_batch_is_a_one_line_user_error(batch, problem):
    with pytest.raises(UserError, match=problem) as info:
        check_detection_batch(batch)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_tiny_ssd_is_pruned_to_the_target_with_the_same_anchors(kind):
    torch.manual_seed(0)
    model = build_detector("tiny_ssd", num_classes=3, image_size=128)
    images, targets = synthetic_batch()
    shapes = head_output_shapes(model, images)
    pruner = Pruner(
        model, images[:1], PhaseSchedule(0, 1, 0, removals=1), keep=0.4, keep_kind=kind, round_to=1
    )
    dense = pruner.size
    assert layer_names(model, pruner.ignored) == TINY_SSD_OUTPUTS
    model.train()
    pruner.step(lambda: model(images, targets))
    assert pruner.size.of(kind) / dense.of(kind) == pytest.approx(0.4, abs=0.02)
    assert model.backbone.stage1[0][0].out_channels < 16  # the backbone did shrink
    assert head_output_shapes(model, images) == shapes  # same anchors, classes, box values


def prune_detector(model, batches, epochs=(1, 1, 1), **settings):
    """``adasap.prune`` of a detector on a list of batches: one step per batch and epoch."""
    warmup, prune, finetune = epochs
    return adasap.prune(model, batches, task="detection", warmup_epochs=warmup,
                        prune_epochs=prune, finetune_epochs=finetune, device="cpu",
                        progress=False, **settings)  # fmt: skip


def phase_loss(result, phase: str) -> float:
    losses = [r["train_loss"] for r in result.history if r["phase"] == phase]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_tiny_ssd_phases_overfit_a_batch_and_reach_the_target(criterion):
    torch.manual_seed(0)
    model = build_detector("tiny_ssd", num_classes=3, image_size=128)
    batch = synthetic_batch()
    result = prune_detector(
        model, [batch], (8, 4, 12), prune_steps=2, keep=0.5, criterion=criterion, lr=0.02,
        lr_warmup_epochs=0, weight_decay=0.0,
    )  # fmt: skip
    pruned = result.model
    assert pruned is not model  # a copy is pruned
    assert result.kept == pytest.approx(0.5, abs=0.02)
    assert result.size.params == sum(p.numel() for p in pruned.parameters())
    assert result.ignored_layers == TINY_SSD_OUTPUTS
    assert [r["phase"] for r in result.history] == ["warmup"] * 8 + ["prune"] * 4 + [
        "finetune"
    ] * 12
    assert all(r["train_accuracy"] is None for r in result.history)  # no accuracy in detection
    assert phase_loss(result, "finetune") < 0.7 * phase_loss(result, "warmup")
    assert set(pruned.eval()(batch[0])[0]) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("kind", ["params", "macs"])
def test_a_backbone_reference_prunes_only_the_backbone_to_its_fraction(kind):
    torch.manual_seed(0)
    model = build_detector("tiny_ssd", num_classes=3, image_size=128)
    head_params = sum(p.numel() for p in model.head.parameters())
    batch = synthetic_batch()
    result = prune_detector(
        model, [batch], (0, 1, 1), keep=0.5, keep_kind=kind, keep_reference="backbone"
    )
    pruned = result.model
    assert result.kept == pytest.approx(0.5, abs=0.02)
    if kind == "params":
        backbone_params = sum(p.numel() for p in model.backbone.parameters())
        kept = sum(p.numel() for p in pruned.backbone.parameters()) / backbone_params
        assert kept == pytest.approx(0.5, abs=0.02)
    assert result.size.params / result.dense_size.params > 0.5  # the head is mostly kept
    # the head keeps its output widths; only its inputs follow the backbone
    assert [m.out_channels for m in detector_output_layers(pruned)] == [12, 12, 12, 16, 16, 16]
    assert 0 < head_params - sum(p.numel() for p in pruned.head.parameters()) < head_params


def test_an_unknown_keep_reference_is_a_user_error():
    model = build_detector("tiny_ssd", num_classes=3)
    with pytest.raises(UserError, match="keep_reference must be model or backbone"):
        prune_detector(model, [synthetic_batch()], (0, 1, 0), keep_reference="neck")


def test_empty_detection_data_is_a_user_error():
    model = build_detector("tiny_ssd", num_classes=3)
    with pytest.raises(UserError, match="yield no batch"):
        prune_detector(model, [], (0, 1, 0))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=[pytest.mark.slow] if name == "ssd300_vgg16" else [])
        for name in TORCHVISION_DETECTORS
    ],
)
def test_torchvision_detector_is_pruned_to_the_target_with_the_same_outputs(name):
    torch.manual_seed(0)
    size = 268 if name == "ssd300_vgg16" else 128
    model = build_detector(name, num_classes=3, image_size=size)
    images, targets = synthetic_batch(size=size)
    shapes = head_output_shapes(model, images[:1])
    pruner = Pruner(
        model, images[:1], PhaseSchedule(0, 1, 0, removals=1), keep=0.5, keep_kind="params"
    )
    assert pruner.ignored == detector_output_layers(model)
    dense = pruner.size
    model.train()
    pruner.step(lambda: model(images, targets))
    assert pruner.size.params / dense.params == pytest.approx(0.5, abs=0.02)
    assert pruner.size.params == sum(p.numel() for p in model.parameters())
    assert head_output_shapes(model, images[:1]) == shapes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn_v2"])
def test_a_macs_target_counts_shared_heads_and_box_head_regions(name):
    """RetinaNet runs one head on five feature maps; Faster R-CNN's box head runs per region."""
    torch.manual_seed(0)
    model = build_detector(name, num_classes=3, image_size=128)
    images, targets = synthetic_batch()
    pruner = Pruner(
        model, images[:1], PhaseSchedule(0, 1, 0, removals=1), keep=0.6, keep_kind="macs"
    )
    dense = pruner.size
    model.train()
    pruner.step(lambda: model(images, targets))
    assert pruner.size.macs / dense.macs == pytest.approx(0.6, abs=0.02)


def test_an_example_the_detector_cannot_run_on_is_a_user_error():
    model = build_detector("tiny_ssd", num_classes=3)
    with pytest.raises(UserError, match="cannot run on the example input") as info:
        Pruner(model, [torch.rand(4, 64, 64)], PhaseSchedule(0, 1, 0))  # 4 channels
    assert "\n" not in str(info.value)


def test_a_training_failure_inside_the_detector_is_a_user_error():
    model = build_detector("tiny_ssd", num_classes=3, image_size=32)  # last map 1 x 1
    image = torch.rand(3, 32, 32)
    target = {"boxes": torch.tensor([[2.0, 2, 20, 20]]), "labels": torch.tensor([1])}
    with pytest.raises(UserError, match="failed on a training batch in phase warmup.*2 images"):
        prune_detector(model, [([image], [target])], (1, 1, 0))


def test_a_pruned_detector_state_is_replayed_on_a_fresh_copy():
    torch.manual_seed(0)
    images, targets = synthetic_batch()
    model = build_detector("tiny_ssd", num_classes=3)
    pruner = Pruner(model, images[:1], PhaseSchedule(0, 2, 0, removals=2), keep=0.5)
    model.train()
    for _ in range(2):
        pruner.step(lambda: model(images, targets))
    fresh = build_detector("tiny_ssd", num_classes=3)
    restored = Pruner(fresh, images[:1], PhaseSchedule(0, 2, 0, removals=2), keep=0.5)
    restored.load_state_dict(pruner.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert restored.size == pruner.size
    assert head_output_shapes(fresh, images) == head_output_shapes(model, images)


def localized(model: nn.Module, images, targets) -> int:
    """True boxes whose class's top-scoring detection overlaps them with IoU > 0.5."""
    model.eval()
    with torch.no_grad():
        detections = model(images)
    hits = 0
    for found, target in zip(detections, targets, strict=True):
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            same = found["labels"] == label
            if same.any():
                top = found["boxes"][same][found["scores"][same].argmax()]
                hits += float(torchvision.ops.box_iou(top[None], box[None])) > 0.5
    return hits


@pytest.mark.slow
def test_tiny_ssd_pruned_to_half_learns_to_localize_squares():
    torch.manual_seed(0)
    data = [synthetic_batch(8, seed=seed) for seed in range(20)]
    held_out = synthetic_batch(32, seed=999)
    model = build_detector("tiny_ssd", num_classes=3)
    untrained = localized(model, *held_out)
    result = prune_detector(
        model, data, (150 / 20, 75 / 20, 75 / 20), keep=0.5, lr=0.05, rho_max=0.1
    )
    model = result.model
    assert result.kept == pytest.approx(0.5, abs=0.02)
    hits = localized(model, *held_out)
    assert hits >= 0.55 * 64 and hits > 1.5 * untrained


def test_tiny_ssd_trains_under_bfloat16_autocast_with_float32_weights():
    torch.manual_seed(0)
    model = build_detector("tiny_ssd", num_classes=3)
    dtypes = set()
    model.backbone.stage3.register_forward_hook(
        lambda module, _i, out: dtypes.add(out.dtype) if module.training else None
    )
    result = prune_detector(model, [synthetic_batch()], (2, 1, 2), keep=0.5, amp="bf16")
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    assert result.kept == pytest.approx(0.5, abs=0.02)


def test_groupnorm_of_several_groups_keeps_its_channels_and_one_group_is_pruned():
    """RetinaNet v2 and FCOS heads use GroupNorm(32 or 16 groups): counts must stay multiples."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 8, 3), nn.GroupNorm(1, 8), nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )  # fmt: skip
    layout = NeuronLayout(model, torch.rand(2, 3, 12, 12), [model[6]])
    assert [g.name for g in layout.groups] == ["3"]


@pytest.mark.parametrize(
    "given, settings, phase_3",
    [
        ({}, None, (0.05, False)),
        ({"finetune_sharpness": "asam"}, None, (2.0, True)),
        ({}, PruneSettings(), (2.0, True)),  # a whole PruneSettings is the caller's choice
    ],
)
def test_detectors_keep_sam_in_phase_3_unless_asked(monkeypatch, given, settings, phase_3):
    """The classification sweeps chose phase-3 ASAM; detection, not swept, keeps SAM."""
    built: list[Pruner] = []

    class Recorded(Pruner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr("adasap.training.pipeline.Pruner", Recorded)
    model = build_detector("tiny_ssd", num_classes=3, image_size=64)
    chosen = {} if settings is None else {"settings": settings}
    prune_detector(model, [synthetic_batch(size=64)], (0, 0, 1), method="sam", keep=1.0,
                   **given, **chosen)  # fmt: skip
    assert phase_sharpness(built[0].settings, finetuning=True) == phase_3
    config = from_flat({"task": "detection", **given}).validate()
    assert config.prune.criterion == "magnitude"
    assert config.prune.pruner.finetune_sharpness == given.get("finetune_sharpness")
