"""benchmarks/gpu_check.py stays runnable: its CPU-vs-CPU dry run end to end at tiny sizes,
and its plain answer where no CUDA GPU is available."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
TINY = [
    "--n-train", "60", "--queries", "4", "--width", "3", "--epochs", "1", "--subsets", "2",
    "--seeds", "1", "--rungs", "hessian,ekfac", "--threads", "1",
]  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_dry_run_cpu_vs_cpu(tmp_path, capsys, restore_threads):
    out = tmp_path / "check.json"
    assert load_script().main(["--device", "cpu", *TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and result["device"] == "cpu"
    stages = [s["stage"] for s in result["stages"]]
    assert stages == [
        "ground truth: base model", "ground truth: retrained models", "fit hessian",
        "inverse + scores hessian", "LDS hessian", "fit ekfac", "inverse + scores ekfac",
        "LDS ekfac",
    ]  # fmt: skip
    assert all(s["error"] == 0.0 for s in result["stages"])  # one device: the same numbers
    assert all(s["cpu_s"] > 0 and s["device_s"] > 0 for s in result["stages"][:4])
    assert "all within tolerance" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_exits_0():
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "no CUDA GPU available here" in run.stderr and "--device cpu" in run.stderr
    assert run.stdout == ""
