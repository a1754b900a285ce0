import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import adasap
from adasap.deploy.serialization import DESCRIPTION_FILE, WEIGHTS_FILE, load_model, save_model
from adasap.errors import UserError
from adasap.io import file_sha256
from adasap.method.importance import magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, remove_neurons, select_neurons, size_predictor
from adasap.models.builders import build_model, find_classifier


def pruned(name, channels, size):
    torch.manual_seed(0)
    architecture = dict(name=name, num_classes=10, in_channels=channels, image_size=size,
                        mean=[0.5] * channels, std=[0.25] * channels)  # fmt: skip
    model = build_model(**architecture).eval()
    x = torch.rand(2, channels, size, size)
    layout = NeuronLayout(model, x, [find_classifier(model, 10)])
    dense = measure_size(model, x)
    scores = normalize_scores(magnitude_scores(layout), layout)
    predict = size_predictor(layout, dense, "params")
    chosen = select_neurons(layout, scores, int(0.6 * dense.params), predict)
    remove_neurons(layout, chosen)
    return model, architecture, layout.graph.pruning_history()


@pytest.mark.parametrize(
    "name,channels,size",
    [("resnet20", 1, 28), ("resnet56", 3, 32), ("resnet18", 3, 32), ("mobilenet_v2", 3, 32),
     ("vgg11_bn", 1, 28)],
)  # fmt: skip
def test_every_model_family_round_trips_with_identical_outputs(tmp_path, name, channels, size):
    model, architecture, history = pruned(name, channels, size)
    save_model(tmp_path, model, architecture, history)
    loaded = adasap.load(tmp_path)
    x = torch.rand(3, channels, size, size)
    assert torch.equal(loaded(x), model(x))
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]
    # the description is plain JSON: no pickle anywhere
    assert json.loads((tmp_path / DESCRIPTION_FILE).read_text())["format"] == "adasap-model"


@pytest.fixture
def saved(tmp_path):
    model, architecture, history = pruned("resnet20", 1, 28)
    save_model(tmp_path, model, architecture, history)
    return tmp_path


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100]),
         "checksum"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), "does not exist"),
        (lambda d: (d / DESCRIPTION_FILE).write_text("{"), "not valid JSON"),
        (lambda d: (d / DESCRIPTION_FILE).write_text('{"format": "onnx"}'), "not an adasap model"),
        (lambda d: (d / DESCRIPTION_FILE).unlink(), "does not exist"),
    ],
)  # fmt: skip
def test_damaged_or_foreign_files_fail_clearly(saved, damage, message):
    damage(saved)
    with pytest.raises(UserError, match=message):
        load_model(saved)


def test_weights_of_another_model_do_not_fit(saved, tmp_path):
    other = tmp_path / "other"
    model, architecture, history = pruned("resnet20", 1, 28)
    save_model(other, model, architecture, [])  # claims an unpruned architecture
    with pytest.raises(UserError, match="does not fit"):
        load_model(other)


def _resave_weights(directory, tensors, metadata):
    """Rewrite the weights file (and its checksum) as a file adasap did not write this way."""
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata=metadata)
    description = json.loads((directory / DESCRIPTION_FILE).read_text())
    description["weights_sha256"] = file_sha256(directory / WEIGHTS_FILE)
    (directory / DESCRIPTION_FILE).write_text(json.dumps(description))


def test_module_versions_survive_the_round_trip(tmp_path):
    # torchvision's MNASNet refuses a state dict without its version metadata (ValueError:
    # "version should be set to 1 or 2 instead of None"), which safetensors alone drops
    model, architecture, history = pruned("mnasnet0_5", 3, 32)
    save_model(tmp_path, model, architecture, history)
    loaded = load_model(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))
    # a file written before the metadata was kept loads with the rebuilt model's versions
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    _resave_weights(tmp_path, tensors, None)
    assert torch.equal(load_model(tmp_path)(x), model(x))
    # a version the module refuses is the files' fault, a UserError, not torchvision's ValueError
    _resave_weights(tmp_path, tensors, {"adasap.module_metadata": '{"net": {"version": 7}}'})
    with pytest.raises(UserError, match="does not fit.*version should be set to 1 or 2"):
        load_model(tmp_path)


def test_damaged_module_metadata_fails_clearly(saved):
    for damaged in ("[1, 2", "[1, 2]", '{"net": 2}'):
        _resave_weights(
            saved, load_file(str(saved / WEIGHTS_FILE)), {"adasap.module_metadata": damaged}
        )
        with pytest.raises(UserError, match="damaged module metadata"):
            load_model(saved)
