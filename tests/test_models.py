import pytest
import torch
import torch_pruning as tp
from torch import nn

from adasap.errors import UserError
from adasap.models.builders import Normalize, build_model, find_classifier, list_models
from test_registry import scratch_copy


def make(name, channels=3, size=32, classes=10, **kwargs):
    return build_model(
        name,
        num_classes=classes,
        in_channels=channels,
        image_size=size,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        **kwargs,
    )


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_cifar_resnet_parameter_counts():
    # ResNet-20, option-B shortcuts, 3 -> 10: stem 432+32; stage 1: 3 x 4672;
    # stage 2: 14528 + 2 x 18560; stage 3: 57728 + 2 x 73984; fc 650.
    assert n_params(make("resnet20")) == 272_474
    assert n_params(make("resnet20", channels=1, size=28)) == 272_474 - 2 * 16 * 9
    # Each extra block per stage adds 4672 + 18560 + 73984 = 97216 parameters.
    assert n_params(make("resnet32")) == 272_474 + 2 * 97_216
    assert n_params(make("resnet56")) == 272_474 + 6 * 97_216


def test_cifar_resnet_structure():
    net = make("resnet20").net
    assert [len(s) for s in (net.layer1, net.layer2, net.layer3)] == [3, 3, 3]
    assert isinstance(net.layer1[0].shortcut, nn.Identity)
    projection = net.layer2[0].shortcut
    assert isinstance(projection[0], nn.Conv2d) and projection[0].kernel_size == (1, 1)
    assert projection[0].stride == (2, 2) and isinstance(projection[1], nn.BatchNorm2d)
    with pytest.raises(UserError, match="6n\\+2"):
        from adasap.models.builders import CifarResNet

        CifarResNet(21, 10)


def test_normalize():
    norm = Normalize([0.1, 0.2, 0.3], [0.5, 1.0, 2.0])
    x = torch.rand(4, 3, 5, 5)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 1.0, 2.0]
    ).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), expected)
    assert set(norm.state_dict()) == {"mean", "std"} and not list(norm.parameters())
    model = make("resnet20").eval()
    assert torch.allclose(model(x[:, :, :4, :4]), model.net((x[:, :, :4, :4] - 0.5) / 0.25))
    assert isinstance(model.normalize, Normalize)


CASES = [
    (name, channels, size)
    for name in ("resnet20", "resnet18", "mobilenet_v2", "vgg11_bn")
    for channels, size in ((1, 28), (3, 32))
] + [("resnet50", 3, 32)]


@pytest.mark.parametrize(("name", "channels", "size"), CASES)
def test_output_shape_and_structural_pruning(name, channels, size):
    model = make(name, channels=channels, size=size).eval()
    x = torch.rand(2, channels, size, size)
    assert model(x).shape == (2, 10)
    assert find_classifier(model, 10) is not None

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    first_conv = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == channels
    width = first_conv.out_channels
    group = graph.get_pruning_group(first_conv, tp.prune_conv_out_channels, idxs=[0, 1, 2])
    group.prune()
    assert first_conv.out_channels == width - 3
    assert model(x).shape == (2, 10)


def test_pruner_keeps_classifier_outputs():
    model = make("resnet20")
    x = torch.rand(2, 3, 32, 32)
    before = n_params(model)
    classifier = find_classifier(model, 10)
    pruner = tp.pruner.MagnitudePruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[classifier],
    )
    pruner.step()
    assert model(x).shape == (2, 10) and classifier.out_features == 10
    assert n_params(model) < 0.4 * before
    assert model.normalize.mean.shape == (1, 3, 1, 1)


def test_small_image_stems():
    small = make("resnet18", channels=1, size=28).net
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity) and small.conv1.in_channels == 1
    large = make("resnet18", channels=1, size=96).net
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d) and large.conv1.in_channels == 1
    assert make("mobilenet_v2", size=32).net.features[0][0].stride == (1, 1)
    vgg = make("vgg11_bn", channels=1, size=8)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.net.features) == 3  # 8 -> 4 -> 2 -> 1
    assert isinstance(vgg.net.classifier, nn.Linear) and vgg.net.classifier.in_features == 512
    assert vgg(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_find_classifier():
    resnet = make("resnet20")
    assert find_classifier(resnet, 10) is resnet.net.fc
    mobilenet = make("mobilenet_v2")
    assert find_classifier(mobilenet, 10) is mobilenet.net.classifier[1]
    assert find_classifier(resnet, 7) is None
    squeeze = make("squeezenet1_1")
    head = find_classifier(squeeze, 10)
    assert isinstance(head, nn.Conv2d) and head is squeeze.net.classifier[1]


def test_any_torchvision_name_works():
    model = make("shufflenet_v2_x0_5", channels=1, size=28)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert model.net.conv1[0].in_channels == 1
    assert "shufflenet_v2_x0_5" in list_models(include_torchvision=True)


def test_list_models():
    names = list_models()
    for name in ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "mobilenet_v2"):
        assert name in names
    assert "vit_b_16" not in names and len(set(names)) == len(names)


def test_unsuitable_image_size_is_user_error():
    with pytest.raises(UserError, match="8px"):
        make("squeezenet1_1", size=8)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet21x", {}, "unknown model 'resnet21x'.*resnet20.*torchvision"),
        ("resnet20", {"pretrained": True}, "no pretrained weights"),
        ("resnet18", {"pretrained": True}, "1000 classes"),
        ("resnet18", {"pretrained": True, "channels": 1, "classes": 1000}, "3-channel"),
    ],
)
def test_bad_requests_are_user_errors(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        make(name, **kwargs)


def test_mean_std_must_match_channels():
    with pytest.raises(UserError, match="one per channel"):
        build_model(
            "resnet20", num_classes=10, in_channels=1, image_size=28, mean=[0.5] * 3, std=[0.2] * 3
        )


def test_pretrained_download_failure_is_user_error(monkeypatch):
    import torchvision.models

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(UserError, match="cannot fetch pretrained weights for resnet18"):
        make("resnet18", classes=1000, size=224, pretrained=True)


def test_timm_models_by_prefix():
    pytest.importorskip("timm")
    model = make("timm:resnet10t", channels=1, size=32, classes=7)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    assert find_classifier(model, 7) is model.net.fc
    assert "timm:resnet10t" in list_models(include_timm=True)
    assert not any(n.startswith("timm:") for n in list_models(include_torchvision=True))
    with pytest.raises(UserError, match="unknown timm model 'resnet10x'.*timm:resnet10t"):
        make("timm:resnet10x")


def test_timm_transformers_are_built_for_the_image_size():
    pytest.importorskip("timm")
    model = make("timm:vit_tiny_patch16_224", size=64).eval()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    assert model.net.pos_embed.shape[1] == 1 + (64 // 16) ** 2  # class token + 4 x 4 patches
    # sizes a model's windows or grids cannot take: one line, whether building or running fails
    with pytest.raises(UserError, match="gcvit_xxtiny cannot be built for 28px.*default is 224"):
        make("timm:gcvit_xxtiny", size=28)  # ZeroDivisionError in timm's constructor
    with pytest.raises(UserError, match="maxxvitv2_nano_rw_256 cannot run on 28px"):
        make("timm:maxxvitv2_nano_rw_256", size=28)  # ZeroDivisionError in its forward
    with pytest.raises(UserError, match="unknown timm model 'vit_tiny_patch16_224.bogus'"):
        make("timm:vit_tiny_patch16_224.bogus", size=64)


def test_timm_cnns_are_built_as_timm_builds_them(monkeypatch):
    timm = pytest.importorskip("timm")
    calls = []
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **kw: calls.append(kw) or create(*a, **kw))
    model = make("timm:resnet10t", channels=1, size=32, classes=7)
    assert "img_size" not in calls[0]  # CNNs take any size; their constructors reject img_size
    expected = create("resnet10t", num_classes=7, in_chans=1)
    assert {k: v.shape for k, v in model.net.state_dict().items()} == {
        k: v.shape for k, v in expected.state_dict().items()
    }


def test_missing_timm_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(UserError, match=r"pip install adasap\[timm\]"):
        make("timm:resnet10t")


def test_unknown_family_is_a_user_error():
    with pytest.raises(UserError, match="unknown model family 'hf'.*timm:"):
        make("hf:resnet18")


def test_a_registered_family_builds_by_prefix(monkeypatch):
    from adasap.models import ModelRequest, register_family, registry

    monkeypatch.setattr(registry, "_FAMILIES", scratch_copy(registry._FAMILIES))
    seen = []

    @register_family("tiny", names=lambda: ["mlp"])
    def build_tiny(name: str, request: ModelRequest) -> nn.Module:
        seen.append((name, request))
        pixels = request.in_channels * request.image_size**2
        return nn.Sequential(nn.Flatten(), nn.Linear(pixels, request.num_classes))

    model = make("tiny:mlp", channels=1, size=4, classes=3)
    assert seen == [("mlp", ModelRequest(3, 1, 4, False))]
    assert model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    with pytest.raises(UserError, match="unknown model 'mlp'"):
        make("mlp")  # not a bare-name family


def test_vit_is_built_for_the_image_size():
    model = make("vit_b_16", size=32)
    assert model.net.image_size == 32 and model.net.encoder.pos_embedding.shape == (1, 5, 768)


def test_shufflenet_shuffle_is_the_torchvision_permutation():
    from torchvision.models.shufflenetv2 import channel_shuffle

    from adasap.models.torchvision_models import ChannelShuffle

    x = torch.rand(2, 12, 3, 3)
    assert torch.equal(ChannelShuffle(2)(x), channel_shuffle(x, 2))
    net = make("shufflenet_v2_x0_5").net
    assert all(isinstance(b.shuffle, ChannelShuffle) for b in net.stage2)
