"""Parsing fetched mail off the event loop: on a thread for a few messages, on a small process
pool for a big batch.

Parsing (the standard library's ``email`` package, HTML sanitising) is pure Python and holds the
GIL, so on a thread it competes with the event loop and the database thread of the same process.
A backlog (the first pass over a full Inbox, a recovery sweep) is parsed by worker processes
instead, which on a 2-core machine nearly doubles import throughput (see README, "Performance and
guarantees"). A message or two from IDLE stays on a thread: a round trip to another process would
only add latency.

The pool is started on first use (``forkserver``: never ``fork`` a process that has threads)
and shut down after ``_IDLE_SHUTDOWN`` seconds without work, so an idle daemon carries no extra
processes. If it breaks (a worker was killed), that batch is parsed on a thread and the next big
batch gets a fresh pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Final, TypeVar

import structlog

from mailbridge.daemon.parse_step import exit_with_parent

log = structlog.get_logger("mailbridge.parsing")

M = TypeVar("M")
I = TypeVar("I")  # noqa: E741 - items
F = TypeVar("F")

POOL_MIN_BATCH: Final = 16  # fewer messages are parsed on a thread
_CHUNKS_PER_WORKER: Final = 2  # smaller pieces even out messages of very different sizes
_IDLE_SHUTDOWN: Final = 30.0

_pool: ProcessPoolExecutor | None = None
_idle_timer: asyncio.TimerHandle | None = None


def pool_workers() -> int:
    """Worker processes for big batches: 0 (no pool) on a single core, else up to 2."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if (cpus or 1) < 2 else 2


def _get_pool(workers: int) -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        context = multiprocessing.get_context("forkserver")
        # Workers fork from a server that has imported the parser already (and only that).
        context.set_forkserver_preload(["mailbridge.daemon.parse_step"])
        _pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=exit_with_parent,
            initargs=(os.getpid(),),
        )
        log.debug("parse_pool_started", workers=workers)
    return _pool


def warm_up_pool() -> None:
    """Start the worker processes now (a backlog was found), so that their start-up - a
    forkserver and two interpreters importing the parser, about a second on a busy machine -
    overlaps the first FETCH instead of delaying the first parse. Does nothing without workers,
    or when they run already."""
    workers = pool_workers()
    if workers == 0 or _pool is not None:
        return
    try:
        pool = _get_pool(workers)
        with _spawning():
            for _ in range(workers):  # workers are spawned on demand: one job each
                pool.submit(os.getpid)
    except (OSError, RuntimeError) as exc:  # parse_off_loop falls back to a thread
        log.debug("parse_pool_warm_up_failed", error=repr(exc))


@contextlib.contextmanager
def _spawning() -> Iterator[None]:
    """Start workers without re-running the main script in each of them.

    multiprocessing "prepares" a spawned or forkserver child by running the parent's main
    script again (as ``__mp_main__``) when the parent was started as a script, not with ``-m``.
    Under the ``mailbridge`` console script (what the systemd unit runs) that imported the whole
    CLI - pydantic, SQLite, the IMAP client, rich - in every worker before it parsed a message.
    The parser needs none of it: while workers start, the main module shows no file to re-run.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        yield  # started with -m (or interactively): nothing is re-run
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


def shutdown_pool() -> None:
    """Stop the worker processes (they are started again when needed)."""
    global _pool, _idle_timer
    if _idle_timer is not None:
        _idle_timer.cancel()
        _idle_timer = None
    if _pool is not None:
        pool, _pool = _pool, None
        pool.shutdown(wait=False, cancel_futures=True)
        log.debug("parse_pool_stopped")


def _arm_idle_shutdown(loop: asyncio.AbstractEventLoop) -> None:
    global _idle_timer
    if _idle_timer is not None:
        _idle_timer.cancel()
    _idle_timer = loop.call_later(_IDLE_SHUTDOWN, shutdown_pool)


async def parse_off_loop(
    parse: Callable[[Sequence[M], int], tuple[list[I], list[F]]],
    fetched: Sequence[M],
    max_bytes: int,
) -> tuple[list[I], list[F]]:
    """``parse(fetched, max_bytes)`` off the event loop; results in the order of ``fetched``.

    ``parse`` must be a module-level function (it is pickled by name for the pool) that never
    raises for a bad message (it returns it among the failures).
    """
    workers = pool_workers()
    if len(fetched) < POOL_MIN_BATCH or workers == 0:
        return await asyncio.to_thread(parse, fetched, max_bytes)
    loop = asyncio.get_running_loop()
    pieces = workers * _CHUNKS_PER_WORKER
    size = -(-len(fetched) // pieces)
    chunks = [list(fetched[i : i + size]) for i in range(0, len(fetched), size)]
    try:
        pool = _get_pool(workers)
        with _spawning():  # a worker is started (if needed) inside submit, synchronously
            futures = [loop.run_in_executor(pool, parse, chunk, max_bytes) for chunk in chunks]
        parts = await asyncio.gather(*futures)
    except (BrokenProcessPool, OSError, RuntimeError) as exc:
        # A killed worker, or no way to start processes here: parse on a thread instead.
        log.warning("parse_pool_unavailable", error=repr(exc), fallback="thread")
        shutdown_pool()
        return await asyncio.to_thread(parse, fetched, max_bytes)
    _arm_idle_shutdown(loop)
    items: list[I] = []
    failures: list[F] = []
    for part_items, part_failures in parts:
        items.extend(part_items)
        failures.extend(part_failures)
    return items, failures
