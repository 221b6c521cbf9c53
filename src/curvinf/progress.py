"""Progress bars for long work (rich): on by default, drawn only once work is slow.

Every long-running function takes ``progress: bool = True``. A bar appears
only after ``PROGRESS_DELAY_S`` seconds of work, so quick calls print nothing
and slow ones (a generic Hessian fit, a Gram ``eigh``, scoring thousands of
examples) show how far they are. ``progress=False`` turns it off; so does the
environment variable ``CURVINF_PROGRESS=0``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PROGRESS_DELAY_S = 2.0


def progress_enabled(requested: bool) -> bool:
    """``requested``, unless ``CURVINF_PROGRESS=0`` silences every bar."""
    return bool(requested) and os.environ.get("CURVINF_PROGRESS", "1") != "0"


@contextmanager
def progress_bar(
    total: int, description: str, enabled: bool, *, delay: float = PROGRESS_DELAY_S
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(k)``; draws a rich progress bar once ``delay`` seconds have passed
    (from a timer, so a single long step shows its elapsed time while it runs)."""
    if not progress_enabled(enabled):
        yield lambda k: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    lock = threading.Lock()
    state: dict = {"done": 0, "bar": None, "task": None, "closed": False}

    def show() -> None:
        with lock:
            if state["closed"]:
                return
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            state["task"] = bar.add_task(description, total=total, completed=state["done"])
            bar.start()
            state["bar"] = bar

    def advance(k: int) -> None:
        with lock:
            state["done"] += k
            if state["bar"] is not None:
                state["bar"].advance(state["task"], k)

    timer = threading.Timer(delay, show)
    timer.daemon = True
    if delay <= 0:
        show()
    else:
        timer.start()
    try:
        yield advance
    finally:
        timer.cancel()
        with lock:
            state["closed"] = True
            if state["bar"] is not None:
                state["bar"].stop()


def announce(message: str, enabled: bool) -> None:
    """One line on stderr before a single long step that no bar can follow (an ``eigh``)."""
    if progress_enabled(enabled):
        print(message, file=sys.stderr, flush=True)
