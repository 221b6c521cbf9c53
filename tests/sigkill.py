"""Kill a ground-truth build with SIGKILL right after its first chunk is on disk.

A helper module, not a conftest: the child process imports the test module that defines
the build, and nothing here may change torch's settings at import (the child sets one
torch thread itself, so its numbers equal the parent's one-thread build).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHILD = """
import sys, time, pathlib
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import curvinf.groundtruth as g
from {module} import {builder} as build
write = g.write_blob
def write_then_stall(path, obj):
    write(path, obj)
    if "chunk-" in str(path):
        time.sleep(120)  # killed here, after the first chunk is on disk
g.write_blob = write_then_stall
build(pathlib.Path({store!r}))
"""


def kill_after_first_chunk(module: str, builder: str, store: Path) -> None:
    """Run ``module.builder(store)`` in a child process, SIGKILL it once
    ``store/*/chunk-00000.pt`` exists, and check that exactly that chunk survived."""
    code = CHILD.format(tests=str(TESTS), module=module, builder=builder, store=str(store))
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(store.glob("*/chunk-00000.pt")):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never wrote its first chunk"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert len(list(store.glob("*/chunk-*.pt"))) == 1
