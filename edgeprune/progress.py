"""Progress reporting that library code can call without knowing about terminals.

Library functions take an optional ``Progress``; the CLI passes a rich-backed one that draws
spinners and bars on stderr, tests and the Python API get the silent default.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


class Progress:
    """Silent progress: logs stage timings at debug level. Subclass to draw something."""

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        logger.debug("%s took %.2f s", description, time.perf_counter() - start)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        with self.stage(description):
            yield from items


class RichProgress(Progress):
    """Spinner per stage and a bar for loops, drawn on stderr by rich."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as _RichProgress

        self._console = console or Console(stderr=True)
        self._columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._factory = _RichProgress

    def _done(self, description: str, start: float) -> None:
        self._console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        if not self._console.is_terminal:  # logs and pipes get the finished lines only
            yield
        else:
            with self._factory(*self._columns[:2], self._columns[4], console=self._console, transient=True) as bar:
                bar.add_task(description, total=None)
                yield
        self._done(description, start)

    def track(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        start = time.perf_counter()
        if not self._console.is_terminal:
            yield from items
        else:
            with self._factory(*self._columns, console=self._console, transient=True) as bar:
                yield from bar.track(items, total=total, description=description)
        self._done(description, start)
