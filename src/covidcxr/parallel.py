"""Batch jobs over many files: parallel workers, a rich progress bar, per-item failures kept.

Every long loop in covidcxr goes through `map_items`, so every batch job shows progress,
uses the cores it is given, and reports each failed item with its reason instead of
stopping at the first one or dropping it silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from covidcxr.errors import CovidCXRError

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Outcome(Generic[Item, Result]):
    """One item's result, or the reason it failed (exactly one of the two is set)."""

    item: Item
    result: Result | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def default_workers() -> int:
    """Worker processes to use: the cores this process may run on (2 on CI)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def make_progress(transient: bool = False) -> Progress:
    """The one progress-bar style of covidcxr's command line (rich)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
    )


def _guarded(func: Callable[[Item], Result], item: Item) -> tuple[Result | None, str | None]:
    # Only our own errors (which name the file and reason) are per-item failures;
    # anything else is a bug and must surface with its traceback.
    try:
        return func(item), None
    except CovidCXRError as exc:
        return None, str(exc)


def map_items(
    func: Callable[[Item], Result],
    items: Sequence[Item] | Iterable[Item],
    workers: int | None = None,
    description: str = "working",
    show_progress: bool = True,
    chunksize: int = 8,
) -> list[Outcome[Item, Result]]:
    """Apply ``func`` to every item, in order, on ``workers`` processes with a progress bar.

    ``func`` must be a picklable module-level function when ``workers > 1``. Items whose
    call raises a `CovidCXRError` come back as failed `Outcome`s carrying the message;
    other exceptions propagate (they are bugs, not bad input).

    Args:
        func: the per-item work.
        items: the inputs.
        workers: processes to use; None means `default_workers()`, 1 runs in this process.
        description: the progress bar's label.
        show_progress: draw the bar (rich hides it automatically when not a terminal).
        chunksize: items sent to a worker at a time.

    Returns:
        One `Outcome` per item, in input order.

    Example:
        >>> outcomes = map_items(len, ["a", "bb"], workers=1, show_progress=False)
        >>> [o.result for o in outcomes]
        [1, 2]
    """
    items = list(items)
    workers = default_workers() if workers is None else max(1, workers)
    workers = min(workers, max(1, len(items)))
    outcomes: list[Outcome[Item, Result]] = []
    with make_progress() as progress:
        task = progress.add_task(description, total=len(items), visible=show_progress)
        if workers == 1:
            for item in items:
                result, error = _guarded(func, item)
                outcomes.append(Outcome(item, result, error))
                progress.advance(task)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                calls = pool.map(_guarded, [func] * len(items), items, chunksize=chunksize)
                for item, (result, error) in zip(items, calls):
                    outcomes.append(Outcome(item, result, error))
                    progress.advance(task)
    return outcomes
