"""Where independent pieces of work run: in this process, in local processes, or on Ray.

One idea: an :class:`Executor` maps a pure function over work items and yields
``(item, result)`` pairs as each result arrives. The caller (the driver) writes every
result to its store itself, atomically, as it arrives, so workers never write a store
and need no shared filesystem; a driver killed at any point resumes from the store.

- :class:`LocalExecutor`: ``workers=1`` runs the items one after another in this process
  (today's behaviour, progress bars included); ``workers > 1`` in spawned processes.
- :class:`RayExecutor`: every item is a Ray task with declared resources (``num_cpus``,
  ``num_gpus``); a task lost with its worker is retried (``max_retries``); every task sets
  torch's thread count to ``threads`` first, so its numbers depend on its inputs only.

Ray is optional (``pip install 'curvinf[ray]'``); :func:`make_executor` says so when
it is missing, before any work.
"""

from __future__ import annotations

import contextlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextvars import ContextVar
from typing import Any

import torch

from curvinf.devices import DeviceSpec, resolve_device
from curvinf.validation import check_choice, check_int

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'curvinf[ray]'"
_CHUNKS: ContextVar[Executor | None] = ContextVar("chunk_executor", default=None)


def _run_task(fn: Callable[..., Any], item: Any, threads: int, *shared: Any) -> Any:
    """``fn(item, *shared)`` with torch's thread count set to ``threads`` (0: unchanged)."""
    if threads:
        torch.set_num_threads(threads)
    return fn(item, *shared)


class Executor(ABC):
    """Maps a function over items; :meth:`map` yields ``(item, result)`` as results arrive."""

    name: str = ""
    in_process: bool = False
    """True when ``fn`` runs in this process (it may then take unpicklable arguments,
    e.g. a progress bar's callback)."""
    threads: int = 0
    """Torch threads every task runs with (0: the process's default)."""

    @abstractmethod
    def map(
        self, fn: Callable[..., Any], items: Iterable[Any], *shared: Any
    ) -> Iterator[tuple[Any, Any]]:
        """Run ``fn(item, *shared)`` for every item; yield ``(item, result)`` as each finishes
        (in any order). ``shared`` is sent to the workers once, not once per item."""

    def close(self) -> None:
        """Release what the executor started (nothing by default)."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """This machine: in this process (``workers=1``) or in ``workers`` spawned processes,
    each with ``threads`` torch threads (0: torch's default)."""

    name = "local"

    def __init__(self, workers: int = 1, threads: int = 0) -> None:
        self.workers = check_int("workers", workers, low=1)
        self.threads = check_int("threads", threads, low=0)
        self.in_process = self.workers == 1

    def map(
        self, fn: Callable[..., Any], items: Iterable[Any], *shared: Any
    ) -> Iterator[tuple[Any, Any]]:
        if self.in_process:
            for item in items:
                yield item, _run_task(fn, item, self.threads, *shared)
            return
        import multiprocessing as mp

        with ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_task, fn, i, self.threads, *shared): i for i in items}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()


def ray_available() -> bool:
    """Whether Ray can be imported here."""
    return importlib.util.find_spec("ray") is not None


class RayExecutor(Executor):
    """Ray tasks, each declaring ``num_cpus`` CPUs and ``num_gpus`` GPUs and running with
    ``threads`` torch threads (default: ``num_cpus``); a task whose worker dies is retried
    up to ``max_retries`` times (an exception the task raises is not retried: it is raised
    here, as itself).

    Connects to the cluster at ``address`` (``"auto"``, ``"ray://host:port"``, ``host:port``)
    or, with ``address=None``, uses the Ray instance this process already started or starts
    a local one (``init_options`` go to ``ray.init``), which :meth:`close` shuts down. The
    workers need curvinf importable (the same installation, or a runtime environment).
    """

    name = "ray"
    in_process = False

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        threads: int | None = None,
        max_retries: int = 3,
        **init_options: Any,
    ) -> None:
        if not ray_available():
            raise ImportError(f"the Ray executor needs Ray: {RAY_INSTALL}")
        import ray

        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {num_cpus}, {num_gpus}.")
        self.threads = check_int("threads", max(1, int(num_cpus)) if threads is None else threads)
        self.max_retries = check_int("max_retries", max_retries, low=0)
        self._started = False
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, **init_options}
            ray.init(address=address, **options)
            self._started = True
        self._task = ray.remote(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_retries=self.max_retries,
            retry_exceptions=False,
        )(_run_task)

    def map(
        self, fn: Callable[..., Any], items: Iterable[Any], *shared: Any
    ) -> Iterator[tuple[Any, Any]]:
        import ray
        from ray.exceptions import RayTaskError

        refs = [ray.put(s) for s in shared]
        pending = {self._task.remote(fn, i, self.threads, *refs): i for i in items}
        try:
            while pending:
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                item = pending.pop(ready)
                try:
                    result = ray.get(ready)
                except RayTaskError as err:
                    raise err.as_instanceof_cause() from None
                yield item, result
        finally:
            for ref in pending:  # the driver stopped early: drop the rest
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


@contextlib.contextmanager
def chunks_on(executor: Executor) -> Iterator[None]:
    """Inside the block, :func:`curvinf.groundtruth.ground_truth` called without an
    ``executor`` (e.g. by the study's ground-truth path) trains its chunks on ``executor``."""
    token = _CHUNKS.set(executor)
    try:
        yield
    finally:
        _CHUNKS.reset(token)


def chunk_executor() -> Executor:
    """The executor of ground-truth chunks here: :func:`chunks_on`'s, else in this process."""
    return _CHUNKS.get() or LocalExecutor()


def check_executor(executor: str, ray_address: str | None = None) -> None:
    """Check an executor request before any work: a known name, ``ray_address`` only with
    ``"ray"``, and Ray importable for ``"ray"`` (else how to install it)."""
    check_choice("executor", executor, EXECUTORS)
    if ray_address is not None and executor != "ray":
        raise ValueError("--ray-address needs --executor ray.")
    if executor == "ray" and not ray_available():
        raise ValueError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}")


def make_executor(
    executor: str,
    *,
    ray_address: str | None = None,
    workers: int = 1,
    threads: int = 0,
    device: DeviceSpec = "cpu",
) -> Executor:
    """The executor named ``executor`` (checked by :func:`check_executor`): a
    :class:`LocalExecutor` of ``workers`` processes, or a :class:`RayExecutor` at
    ``ray_address`` (None: a local Ray instance) whose tasks each declare and use ``threads``
    CPUs and torch threads (0: one) and, when ``device`` is a CUDA device, one GPU
    (``num_gpus=1``: Ray then gives each task its own GPU, which it sees as ``cuda:0``)."""
    check_executor(executor, ray_address)
    if executor == "local":
        return LocalExecutor(workers, threads)
    gpus = 1 if resolve_device(device).type == "cuda" else 0
    return RayExecutor(ray_address, num_cpus=threads or 1, num_gpus=gpus)


__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "check_executor",
    "chunk_executor",
    "chunks_on",
    "make_executor",
    "ray_available",
]
