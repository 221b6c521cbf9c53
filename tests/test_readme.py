"""The README's tour and its "your own model" example run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = README.read_text()
    start = text.index(heading)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.S)
    assert match is not None, f"no python block after {heading!r}"
    return match.group(1)


def test_the_tour_and_the_own_model_example_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CURVINF_PROGRESS", "0")
    namespace: dict = {}
    exec(python_block("## A short tour"), namespace)  # noqa: S102 - the README's own code
    assert namespace["own"].shape == (1437,) and (namespace["own"] > 0).all()
    exec(python_block("### Your own model"), namespace)  # noqa: S102
    assert namespace["scores"].shape == (200, 800)
    assert torch.isfinite(namespace["scores"]).all()
    assert namespace["curv"].uncovered == {
        "tokens": "exact GGN block",
        "positions": "exact GGN block",
    }
    exec(python_block("### The ladder on your own model"), namespace)  # noqa: S102
    rows = namespace["result"].rows
    assert len(rows) == 5 * 2 and all(r["status"] == "exact" for r in rows)
    assert all(0.0 < r["lds"] < 1.0 for r in rows)
    assert (tmp_path / "results" / "net" / "results.csv").exists()
