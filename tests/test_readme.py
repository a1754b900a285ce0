"""The README's own-loop example runs as written: a timm model, a user's DataLoader, 15 lines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def user_loop_code() -> str:
    text = README.read_text()
    marker = text.index("<!-- user-loop:")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, marker)
    return match.group(1)


def test_the_user_loop_is_about_fifteen_lines():
    lines = [line for line in user_loop_code().splitlines() if line.strip()]
    assert len(lines) <= 20


@pytest.mark.slow
def test_the_readme_user_loop_prunes_a_timm_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    monkeypatch.setenv("ADASAP_CACHE", str(tmp_path))
    namespace: dict = {}
    exec(compile(user_loop_code(), "README.md", "exec"), namespace)
    pruner = namespace["pruner"]
    assert 0.45 <= pruner.size.macs / pruner.target.dense.macs <= 0.505  # the MACs target
    report = namespace["report"]
    assert report.corruption_accuracy is not None and 0 <= report.clean_accuracy <= 1
    assert namespace["model"](namespace["images"]).shape[-1] == 10
