"""Every tested architecture, built from scratch, through the public pipeline: prune to half
its MACs (a few: its parameters), run, export to ONNX (checked with onnxruntime) and reload
from safetensors."""

import pytest
import torch

import adasap
from adasap.data import load_dataset
from adasap.deploy.onnx import export_onnx
from adasap.deploy.serialization import load_model, save_model
from adasap.models import build_model

LIGHT = [("squeezenet1_1", 32), ("shufflenet_v2_x0_5", 32)]
HEAVY = [
    ("resnet18", 32),
    ("resnet50", 32),
    ("mobilenet_v2", 32),
    ("mobilenet_v3_large", 32),
    ("efficientnet_b1", 32),
    ("regnet_y_400mf", 32),
    ("vgg11_bn", 32),
    ("convnext_tiny", 32),
    ("vit_b_16", 32),
    ("timm:resnet26d", 32),
    ("timm:efficientnet_b0", 32),
    ("timm:mobilevit_xs", 64),
]
CASES = LIGHT + [pytest.param(*case, marks=pytest.mark.slow) for case in HEAVY]
# The pruned timm:efficientnet_b0 at odd blocks left PyTorch's float32 and float64 logits apart
# by more than the ONNX check allows: it prunes to half its parameters in any channel count.
# (ConvNeXt, ViT and MobileViT missed the MACs target too until Linear layers' MACs were
# counted per token: they now take the default.)
PARAMETER_TARGET = {"timm:efficientnet_b0"}


@pytest.mark.parametrize(("name", "size"), CASES)
def test_prunes_to_half_then_exports_and_reloads(name, size, tmp_path):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    data = load_dataset(
        "synthetic", num_classes=4, channels=3, image_size=size, num_train=10, num_test=4,
        val_fraction=0.2,
    )  # fmt: skip
    architecture = dict(
        name=name, num_classes=4, in_channels=3, image_size=size, mean=[0.5] * 3, std=[0.25] * 3
    )
    model = build_model(**architecture).eval()
    x = torch.rand(3, 3, size, size)
    assert model(x).shape == (3, 4)

    # 8 training images, batch 8: the single removal step happens at the one training step.
    # Magnitude scores: after one step from scratch, Taylor scores left timm:efficientnet_b0
    # so ill-conditioned that PyTorch's own float32 and float64 logits differed by more than
    # the ONNX check allows (seen in a slow-set run); the shapes are what this test is about.
    target = dict(keep_kind="params", round_to=1) if name in PARAMETER_TARGET else {}
    result = adasap.prune(
        model, data, keep=0.5, warmup_epochs=0, prune_epochs=1, finetune_epochs=0, prune_steps=1,
        batch_size=8, method="sgd", criterion="magnitude", device="cpu", amp="off",
        channels_last=False, progress=False, **target,
    )  # fmt: skip
    # the default target: half the MACs, in the default runtime's channel blocks, which
    # leave it at most a block's worth under
    assert 0.44 <= result.keep_fraction(target.get("keep_kind", "macs")) <= 0.505
    pruned = result.model.eval()
    assert sum(p.numel() for p in pruned.parameters()) == result.size.params
    with torch.no_grad():
        expected = pruned(x)
    assert expected.shape == (3, 4) and torch.isfinite(expected).all()

    save_model(tmp_path / "model", pruned, architecture, result.pruning_history)
    loaded = load_model(tmp_path / "model").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    # one step from scratch can leave large logits: compare with onnxruntime relative to them
    scale = max(1.0, float(expected.abs().max()))
    report = export_onnx(pruned, tmp_path / "model.onnx", image_size=size, tolerance=1e-4 * scale)
    assert report.passed, str(report)
