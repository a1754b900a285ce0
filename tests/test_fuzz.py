"""Property-based fuzzing of the bad-input promise (README, "Bad input"): a mutated config, model
file or COCO annotation file is either accepted or refused with one short ``UserError`` line;
never another exception, never a file touched (or, for COCO, read) outside the example's folder.

Valid inputs are built once per module and each example works on a mutated copy, so examples
are cheap. The fast variants are seeded (``derandomize``) so ``make test`` is reproducible; the
``slow`` variants run many more examples. Time is not asserted (timings flake on shared CPUs):
input sizes are bounded instead, and pure-Python readers get a ``tracemalloc`` peak bound.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import adasap
from adasap.data.detection_files import load_coco
from adasap.deploy.serialization import DESCRIPTION_FILE, save_model
from adasap.errors import UserError
from adasap.experiments.config import SCHEMA, ExperimentConfig, from_flat, load_yaml
from adasap.method.importance import magnitude_scores, normalize_scores
from adasap.method.neurons import NeuronLayout
from adasap.method.pruning import measure_size, remove_neurons, select_neurons, size_predictor
from adasap.models.builders import build_model, find_classifier
from test_hostile_annotations import coco_data

MAX_MESSAGE = 300  # "one line": a message quotes at most a prefix of a bad value
# An unknown config key's message lists every allowed key (~750 characters): one line, by design.
MAX_CONFIG_MESSAGE = 1000
MAX_PEAK_BYTES = 64 << 20  # a few-KB input must not cost more than this in Python objects

# Fast set: three properties at these counts stay well under 30 s on a busy 2-core machine.
FAST = dict(derandomize=True, deadline=None, database=None)
FAST_EXAMPLES = {"config": 200, "model": 200, "coco": 300}
SLOW = dict(deadline=None, database=None)
SLOW_EXAMPLES = {"config": 3000, "model": 600, "coco": 2000}


# --- mutations ------------------------------------------------------------------------------

# Scalars a JSON or YAML reader may meet; huge ints and non-finite floats are the usual traps.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "../outside.png", "/etc/passwd", "nan", "1e9999"]),
    st.integers(1_000, 20_000).map(lambda n: "x" * n),  # a long string, with a short repr
)
# Small nested values: bounded so an example's size (and so its time and memory) stays small.
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def paths_in(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path into ``value`` (the root is ``()``), for picking where to mutate."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths_in(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths_in(item, (*prefix, index))


def mutate_once(data: st.DataObject, value: Any, keys: list[str]) -> Any:
    """One random edit of ``value``: replace, drop, add or nest at a random place. ``keys``
    are names worth adding (a schema's), so added keys are sometimes meaningful."""
    path = data.draw(st.sampled_from(list(paths_in(value))), label="path")
    op = data.draw(st.sampled_from(["replace", "drop", "add", "nest"]), label="op")
    if not path:  # the root: only replacing or nesting it makes sense
        new = data.draw(values, label="root") if op in ("replace", "drop") else [value]
        return new
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if op == "replace":
        parent[last] = data.draw(values, label="value")
    elif op == "drop":
        del parent[last]
    elif op == "nest":
        parent[last] = [parent[last]] * data.draw(st.integers(1, 3), label="copies")
    elif isinstance(parent, dict):
        key = data.draw(st.one_of(st.sampled_from(keys), st.text(max_size=8)), label="key")
        parent[key] = data.draw(values, label="added")
    else:
        parent.insert(last, data.draw(values, label="added"))
    return value


def mutate(data: st.DataObject, value: Any, keys: list[str]) -> Any:
    value = copy.deepcopy(value)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        value = mutate_once(data, value, keys)
    return value


def damage_text(data: st.DataObject, text: str) -> str:
    """Sometimes truncate the serialized text or splice in junk (syntax errors, odd bytes)."""
    op = data.draw(st.sampled_from(["keep", "keep", "truncate", "splice"]), label="text op")
    if op == "keep":
        return text
    at = data.draw(st.integers(0, len(text)), label="at")
    if op == "truncate":
        return text[:at]
    junk = data.draw(st.text(max_size=10) | st.sampled_from(["{", "]", "&a *a", "\x00", "\ufeff"]))
    return text[:at] + junk + text[at:]


# --- the promise ----------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of everything under ``root``: a write outside the example shows here."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            stat = (Path(folder) / name).stat()
            found[str(Path(folder, name))] = (stat.st_size, stat.st_mtime_ns)
    return found


@contextmanager
def example_folder(sandbox: Path) -> Iterator[Path]:
    """A fresh folder for one example inside ``sandbox``; everything else in the sandbox (the
    valid originals and a bait file beside them) must be unchanged afterwards."""
    before = snapshot(sandbox)
    folder = sandbox / "example"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert snapshot(sandbox) == before, "a file outside the example's folder changed"


def accepted_or_one_line(
    call: Callable[[], Any], *, trace_memory: bool = True, max_length: int = MAX_MESSAGE
) -> Any:
    """``call()``'s result, or None for a one-line UserError; any other exception propagates
    (the property fails and Hypothesis prints the minimal input)."""
    if trace_memory:
        tracemalloc.start()
    try:
        return call()
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert 0 < len(message) <= max_length, message
        return None
    finally:
        if trace_memory:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < MAX_PEAK_BYTES, f"peak {peak} bytes"


# --- 1. config YAML -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_sandbox(tmp_path_factory) -> tuple[Path, dict]:
    sandbox = tmp_path_factory.mktemp("config")
    flat = ExperimentConfig().to_flat()
    (sandbox / "valid.yaml").write_text(yaml.safe_dump(flat))
    return sandbox, flat


def check_config(sandbox: Path, flat: dict, data: st.DataObject) -> None:
    mutated = mutate(data, flat, sorted(SCHEMA))
    text = damage_text(data, yaml.safe_dump(mutated, allow_unicode=True))
    with example_folder(sandbox) as folder:
        path = folder / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        accepted_or_one_line(
            lambda: from_flat(load_yaml(path), source=str(path)).validate(),
            max_length=MAX_CONFIG_MESSAGE,
        )


@settings(max_examples=FAST_EXAMPLES["config"], **FAST)
@given(data=st.data())
def test_fuzzed_configs_load_or_fail_in_one_line(config_sandbox, data):
    check_config(*config_sandbox, data)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES["config"], **SLOW)
@given(data=st.data())
def test_fuzzed_configs_load_or_fail_in_one_line_long(config_sandbox, data):
    check_config(*config_sandbox, data)


# --- 2. model files -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_sandbox(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny pruned resnet20 (so the history is replayed, not empty) saved once."""
    sandbox = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    architecture = dict(name="resnet20", num_classes=3, in_channels=1, image_size=8,
                        mean=[0.5], std=[0.5])  # fmt: skip
    model = build_model(**architecture).eval()
    x = torch.rand(2, 1, 8, 8)
    layout = NeuronLayout(model, x, [find_classifier(model, 3)])
    dense = measure_size(model, x)
    scores = normalize_scores(magnitude_scores(layout), layout)
    predict = size_predictor(layout, dense, "params")
    chosen = select_neurons(layout, scores, int(0.6 * dense.params), predict)
    remove_neurons(layout, chosen)
    save_model(sandbox / "valid", model, architecture, layout.graph.pruning_history())
    adasap.load(sandbox / "valid")  # the unmutated original loads
    return sandbox, json.loads((sandbox / "valid" / DESCRIPTION_FILE).read_text())


# Sizes the loader accepts but that would make one example slow (a 2048-pixel trace, 100k
# classes): the bounds themselves are tested in test_hostile_json.py, so keep examples cheap.
def _cheap(description: Any) -> bool:
    architecture = description.get("architecture") if isinstance(description, dict) else None
    if not isinstance(architecture, dict):
        return True
    for key, limit in (("image_size", 64), ("num_classes", 1000), ("in_channels", 8)):
        size = architecture.get(key)
        if isinstance(size, (int, float)) and not isinstance(size, bool):
            if math.isfinite(size) and abs(size) > limit:
                return False
    return True


def check_model(sandbox: Path, description: dict, data: st.DataObject) -> None:
    keys = ["format", "version", "architecture", "pruning_history", "weights_sha256", "task"]
    mutated = mutate(data, description, keys)
    text = damage_text(data, json.dumps(mutated))
    if not _cheap(mutated):
        return
    with example_folder(sandbox) as folder:
        shutil.copytree(sandbox / "valid", folder / "model")
        (folder / "model" / DESCRIPTION_FILE).write_text(text, errors="surrogatepass")
        # torch's allocations are not Python objects: tracemalloc would only slow this down
        accepted_or_one_line(lambda: adasap.load(folder / "model"), trace_memory=False)


@settings(max_examples=FAST_EXAMPLES["model"], suppress_health_check=[HealthCheck.too_slow], **FAST)
@given(data=st.data())
def test_fuzzed_model_files_load_or_fail_in_one_line(model_sandbox, data):
    check_model(*model_sandbox, data)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES["model"], suppress_health_check=[HealthCheck.too_slow], **SLOW)
@given(data=st.data())
def test_fuzzed_model_files_load_or_fail_in_one_line_long(model_sandbox, data):
    check_model(*model_sandbox, data)


# --- 3. COCO annotations --------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_sandbox(tmp_path_factory) -> Path:
    """The images once, plus a valid 30x20 bait image outside the image folder: a loader that
    followed ``../outside.png`` would accept it, so success must never name it."""
    sandbox = tmp_path_factory.mktemp("coco")
    (sandbox / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (30, 20)).save(sandbox / "images" / name)
    Image.new("RGB", (30, 20)).save(sandbox / "outside.png")
    return sandbox


def coco_file_names(sandbox: Path) -> st.SearchStrategy[str]:
    outside = str(sandbox / "outside.png")
    return st.sampled_from(["../outside.png", outside, "./../outside.png",
                            "a.png/../../outside.png", "b.png", "./a.png", "", ".", "..", "/",
                            "a.png\x00"])  # fmt: skip


def check_coco(sandbox: Path, data: st.DataObject) -> None:
    keys = ["images", "annotations", "categories", "file_name", "bbox", "id", "image_id",
            "category_id", "iscrowd", "width", "height", "name"]  # fmt: skip
    mutated = mutate(data, coco_data(), keys)
    if data.draw(st.booleans(), label="point a file name elsewhere"):
        images = mutated.get("images") if isinstance(mutated, dict) else None
        if isinstance(images, list) and images and isinstance(images[0], dict):
            images[0]["file_name"] = data.draw(coco_file_names(sandbox), label="file_name")
    text = damage_text(data, json.dumps(mutated))
    with example_folder(sandbox) as folder:
        path = folder / "instances.json"
        path.write_text(text, errors="surrogatepass")
        loaded = accepted_or_one_line(lambda: load_coco(sandbox / "images", path))
    if loaded is not None:
        inside = (sandbox / "images").resolve()
        for image in loaded.paths:
            assert Path(image).resolve().is_relative_to(inside), image


@settings(max_examples=FAST_EXAMPLES["coco"], **FAST)
@given(data=st.data())
def test_fuzzed_coco_files_load_or_fail_in_one_line(coco_sandbox, data):
    check_coco(coco_sandbox, data)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES["coco"], **SLOW)
@given(data=st.data())
def test_fuzzed_coco_files_load_or_fail_in_one_line_long(coco_sandbox, data):
    check_coco(coco_sandbox, data)
