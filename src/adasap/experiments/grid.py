"""The one grid engine of the benchmark, the detection benchmark and the sweep: a :class:`Grid`
is an output folder of resumable results; its cells run one after another, in local processes
(``jobs``), or as tasks on a Ray cluster (``ray``).

A cell is a call of a module-level function that writes its own result into the output folder,
so a result outlives the process that asked for it. :func:`run_cells` yields the outcomes in
the cells' order whatever order they finish in, so that the serial and the parallel grid write
the same results file; the parent process alone prints, one line per finished cell.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic

import torch
from rich.console import Console

from adasap.errors import UserError
from adasap.experiments.results import GridFiles, R, report_failure
from adasap.training.checkpoint import RunInterrupted

Task = tuple[str, tuple[Any, ...]]  # (cell name, arguments of the cell function)
Outcome = Any  # the cell function's result, or the UserError it raised


@dataclass(frozen=True)
class Parallel:
    """How a grid runs its cells: ``jobs`` at once, in local processes or on the Ray cluster at
    ``ray`` (an address for ``ray.init``: ``auto``, ``ray://host:10001``, or ``local`` for a
    Ray instance on this machine). Locally each of the ``jobs`` processes computes with its
    share of the cores; on Ray each cell reserves ``1/jobs`` of the cluster's CPUs (at most one
    machine's), or one CPU when ``jobs`` is None: then as many cells run as the cluster fits."""

    jobs: int | None = None
    ray: str | None = None

    def validate(self) -> Parallel:
        if self.jobs is not None and (
            isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1
        ):
            raise UserError(f"jobs must be a whole number of at least 1, got {self.jobs!r}")
        if self.ray is not None and not self.ray.strip():
            raise UserError("the Ray address is empty: give --ray auto, ray://HOST:PORT or local")
        return self

    @property
    def serial(self) -> bool:
        return self.ray is None and (self.jobs or 1) == 1


@dataclass
class Grid(Generic[R]):
    """A grid's output folder, its finished rows (``done``, by cell: :meth:`GridFiles.open`) and
    how its cells run."""

    files: GridFiles[R]
    out: Path
    cells: list[Any]  # in grid order, each named by its ``id``
    done: dict[str, R]
    parallel: Parallel
    console: Console
    device: str  # the cells' device setting: with auto or cuda each cell gets a GPU

    def todo(self) -> list[Any]:
        """The cells not finished yet, in grid order."""
        return [cell for cell in self.cells if cell.id not in self.done]

    @contextlib.contextmanager
    def running(self, todo: list[Any]) -> Iterator[None]:
        """Connected to the Ray cluster (if any, and if there is work); an interrupted grid
        names its folder, which a rerun continues."""
        try:
            with connected(self.parallel) if todo else contextlib.nullcontext():
                yield
        except RunInterrupted as exc:
            exc.run_dir = self.out
            raise

    def run(
        self,
        function: Callable[..., Any],
        tasks: list[Task],
        describe: Callable[[Any], str],
        fatal: bool = False,
    ) -> None:
        """Run ``tasks``, appending their rows (if any: a dense model trained into the cache has
        none) to the results file in the tasks' order. A :class:`UserError` stops the grid when
        ``fatal`` (say, no cell of a seed could run); otherwise the cell is reported, logged to
        ``failures.jsonl`` and skipped: the next run tries it again."""
        for name, outcome in run_cells(
            function, tasks, self.parallel, self.console, describe, device=self.device
        ):
            if isinstance(outcome, UserError):
                if fatal:
                    raise outcome
                report_failure(self.out, name, outcome, self.console)
            elif isinstance(outcome, self.files.row):
                self.files.append(self.out, outcome)
                self.done[name] = outcome


def available_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def fair_threads(jobs: int, cores: int | None = None) -> int:
    """Torch threads per process when ``jobs`` processes share ``cores`` (all by default)."""
    return max(1, (cores or available_cores()) // jobs)


def run_cells(
    function: Callable[..., Any],
    tasks: Sequence[Task],
    parallel: Parallel,
    console: Console,
    describe: Callable[[Any], str],
    *,
    device: str = "cpu",
) -> Iterator[tuple[str, Outcome]]:
    """Call ``function(*args)`` for every ``(name, args)`` task; yield ``(name, outcome)`` in
    the tasks' order. The outcome is the result or the :class:`UserError` the cell raised; any
    other exception stops the grid once the cells already running have ended (their results
    are in the output folder). A serial grid passes ``console=console`` to ``function``, a
    parallel one nothing (its cells print nothing; the parent prints ``describe(result)``).
    ``device`` is the cells' device setting: with ``auto`` or ``cuda`` each cell gets a GPU
    of its own (local processes take the visible GPUs in turn; a Ray task reserves one).
    """
    parallel = parallel.validate()
    if not tasks:
        return
    use_gpus = device in ("auto", "cuda")  # "cuda:N" names one GPU: the cells keep it
    if parallel.serial:
        for number, (name, args) in enumerate(tasks, 1):
            try:
                result = function(*args, console=console)
            except UserError as exc:
                yield name, exc
                continue
            console.print(f"[bold]{name}[/bold]: {describe(result)} ({number} of {len(tasks)})")
            yield name, result
        return
    if parallel.ray is not None:
        yield from _on_ray(function, tasks, parallel, console, describe, use_gpus)
        return
    jobs = parallel.jobs or 1
    # from jobs, not from the cells at hand: a cell computes with the same threads (and so
    # gives the same numbers) in a phase of one cell as in a full one
    threads = fair_threads(jobs)
    devices = _visible_gpus() if use_gpus else []
    console.print(
        f"{_count(len(tasks), 'cell')} in {_count(min(jobs, len(tasks)), 'process')} of "
        f"{_count(threads, 'thread')}" + (f", GPUs {', '.join(devices)} in turn" if devices else "")
    )
    context = multiprocessing.get_context("spawn")  # fork is unsafe with torch's threads
    counter = context.Value("i", 0)
    with ProcessPoolExecutor(
        min(jobs, len(tasks)),
        mp_context=context,
        initializer=_start_worker,
        initargs=(threads, devices, counter, os.getpid()),
    ) as pool:
        futures = [pool.submit(_in_worker, function, args) for _, args in tasks]
        yield from _in_order(tasks, futures, console, describe, lambda f: f.cancel())


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


_busy = False  # a worker is running a cell


def _start_worker(threads: int, devices: list[str], counter: Any, parent: int) -> None:
    """A local worker: its share of the threads, its GPU, Ctrl-C for running cells only, and
    an end when ``parent`` (the grid's process) is gone."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    if devices:  # before CUDA starts in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
    torch.set_num_threads(threads)

    def interrupt(signum: int, frame: Any) -> None:
        # Ctrl-C reaches every process of the terminal's group: a training cell saves its
        # checkpoint (its own handler is active then); an idle worker stays quiet.
        _interrupted.set()
        if _busy:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    # the pid from the parent itself: it may have died while this worker was starting
    threading.Thread(target=_follow_parent, args=(parent,), daemon=True).start()


# how often a worker looks for its parent, and how long a running cell then has to stop
PARENT_POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 120.0
_orphaned = threading.Event()  # the grid's process is gone: no cell is for anyone
# Ctrl-C came: the cells the pool had already queued for this worker (which the parent cannot
# cancel any more) must not start, or the parent would wait for them to finish
_interrupted = threading.Event()


def _follow_parent(parent: int) -> None:
    """End this worker once the grid's process is gone (killed, so it could not shut the pool
    down); otherwise the worker would finish its cell for no one, then start the queued ones.
    A running cell is first interrupted as by Ctrl-C, so a training cell saves its checkpoint
    for the next run (:func:`_in_worker` then exits)."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    _orphaned.set()
    if _busy:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(STOP_GRACE_SECONDS)
    os._exit(1)


def _in_worker(function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    global _busy
    if _orphaned.is_set():
        os._exit(1)
    if _interrupted.is_set():
        raise KeyboardInterrupt
    _busy = True
    try:
        return function(*args)
    except (KeyboardInterrupt, RunInterrupted):  # a training cell's own handler took Ctrl-C
        _interrupted.set()
        raise
    finally:
        _busy = False
        if _orphaned.is_set():
            os._exit(1)


def _in_order(
    tasks: Sequence[Task],
    futures: list[Future],
    console: Console,
    describe: Callable[[Any], str],
    cancel: Callable[[Future], Any],
    unwrap: Callable[[BaseException], BaseException] = lambda exc: exc,
) -> Iterator[tuple[str, Outcome]]:
    """The outcomes of ``futures`` in the tasks' order, printed as they finish."""
    index = {future: i for i, future in enumerate(futures)}
    ready: dict[int, Outcome] = {}
    pending, following, finished = set(futures), 0, 0
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=index.__getitem__):
                name = tasks[index[future]][0]
                error = future.exception()
                if error is not None:
                    error = unwrap(error)
                    if not isinstance(error, UserError):
                        raise error
                finished += 1
                if error is None:
                    console.print(
                        f"[bold]{name}[/bold]: {describe(future.result())} "
                        f"({finished} of {len(tasks)})"
                    )
                ready[index[future]] = error if error is not None else future.result()
            while following in ready:
                yield tasks[following][0], ready.pop(following)
                following += 1
    except BaseException as exc:
        running = [f for f in pending if not cancel(f)]
        if running:
            console.print(f"stopping ({type(exc).__name__}): waiting for {len(running)} cells")
            wait(running)
        if isinstance(exc, KeyboardInterrupt):
            raise RunInterrupted(None) from exc
        raise


def _on_ray(
    function: Callable[..., Any],
    tasks: Sequence[Task],
    parallel: Parallel,
    console: Console,
    describe: Callable[[Any], str],
    use_gpus: bool,
) -> Iterator[tuple[str, Outcome]]:
    """The cells as Ray tasks, each with its share of the cluster's CPUs (and a GPU)."""
    ray = _ray()
    with connected(parallel):
        total = ray.cluster_resources()
        node_cpus = max(n["Resources"].get("CPU", 1) for n in ray.nodes() if n["Alive"])
        # a fixed share per cell, whatever the cells at hand: the same threads, the same numbers
        share = total.get("CPU", 1) // parallel.jobs if parallel.jobs else 1
        cpus = int(max(1, min(node_cpus, share)))
        gpus = 1 if use_gpus and total.get("GPU", 0) >= 1 else 0
        console.print(
            f"{_count(len(tasks), 'cell')} on Ray ({int(total.get('CPU', 0))} CPUs, "
            f"{int(total.get('GPU', 0))} GPUs): {_count(cpus, 'CPU')}"
            + (" and a GPU" if gpus else "")
            + " per cell"
        )
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_ray_cell)
        refs = [remote.remote(function, cpus, args) for _, args in tasks]
        futures = {ref.future(): ref for ref in refs}
        yield from _in_order(
            tasks,
            list(futures),
            console,
            describe,
            # a cancelled task still ends its future (TaskCancelledError): wait for it
            cancel=lambda future: ray.cancel(futures[future]),
            # a cell's exception comes wrapped in a RayTaskError
            unwrap=lambda exc: getattr(exc, "cause", None) or exc,
        )


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(
            "--ray needs Ray: pip install 'adasap[ray]' (on every machine of the cluster)"
        ) from None
    return ray


@contextlib.contextmanager
def connected(parallel: Parallel) -> Iterator[None]:
    """Connected to ``parallel.ray`` (if any) until the end of the block: the phases of a grid
    share one connection. A process already connected (``ray.init``) keeps its connection."""
    if parallel.ray is None or _ray().is_initialized():
        yield
        return
    ray = _ray()
    cache = os.environ.get("ADASAP_CACHE")  # the tasks' cache: the same shared folder
    try:
        ray.init(
            address=parallel.ray,
            runtime_env={"env_vars": {"ADASAP_CACHE": cache}} if cache else None,
        )
    except ConnectionError as exc:
        raise UserError(
            f"cannot reach the Ray cluster at {parallel.ray} ({exc}): start it with "
            "'ray start --head', or give --ray local"
        ) from exc
    try:
        yield
    finally:
        ray.shutdown()


def _ray_cell(function: Callable[..., Any], threads: int, args: tuple[Any, ...]) -> Any:
    torch.set_num_threads(threads)
    return function(*args)
