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
import time
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
    """Yield ``advance(k)``; draws a rich progress bar once ``delay`` seconds have passed."""
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

    start = time.perf_counter()
    state: dict = {"done": 0, "bar": None, "task": None}

    def advance(k: int) -> None:
        state["done"] += k
        bar = state["bar"]
        if bar is not None:
            bar.advance(state["task"], k)
        elif time.perf_counter() - start >= delay:
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            bar.start()
            state["bar"] = bar
            state["task"] = bar.add_task(description, total=total, completed=state["done"])

    try:
        yield advance
    finally:
        if state["bar"] is not None:
            state["bar"].stop()


def announce(message: str, enabled: bool) -> None:
    """One line on stderr before a single long step that no bar can follow (an ``eigh``)."""
    if progress_enabled(enabled):
        print(message, file=sys.stderr, flush=True)
