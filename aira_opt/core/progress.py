"""Progress for long work: numbered steps reported through a callback (the CLI prints them; the Python API
passes its caller's), and a bar for loops (tqdm, on stderr)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One thing a long job reports: a step starting (`seconds` None), a step done (its `seconds`), or a note
    about the current step (`step` 0)."""

    step: int
    total: int
    what: str
    seconds: float | None = None


ProgressCallback = Callable[[Progress], None]


def print_progress(event: Progress) -> None:
    """The CLI's rendering: `[i/n] what ...`, then `done (1.2s)`, notes indented, all on stderr (stdout stays
    clean for --json)."""
    if event.step == 0:
        line = f"      {event.what}"
    elif event.seconds is None:
        line = f"[{event.step}/{event.total}] {event.what} ..."
    else:
        line = f"      done ({event.seconds:.1f}s)"
    print(line, file=sys.stderr, flush=True)


class Steps:
    """Numbered steps with their timings, reported to `on_progress` (None: silent)."""

    def __init__(self, total: int, on_progress: ProgressCallback | None = None):
        self.total, self.index, self.on_progress = total, 0, on_progress

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.index += 1
        start = time.perf_counter()
        self._report(Progress(self.index, self.total, what))
        yield
        self._report(Progress(self.index, self.total, what, time.perf_counter() - start))

    def note(self, what: str) -> None:
        """A line about the current step (a measurement, a warning)."""
        self._report(Progress(0, self.total, what))

    def _report(self, event: Progress) -> None:
        if self.on_progress is not None:
            self.on_progress(event)


def bar(items: Iterable[T], desc: str, total: int | None = None, quiet: bool = False) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, disable=quiet or None, file=sys.stderr, leave=False)
