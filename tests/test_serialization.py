import json

import pytest
import torch

import adasap
from adasap.deploy.serialization import DESCRIPTION_FILE, WEIGHTS_FILE, load_model, save_model
from adasap.errors import UserError
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
