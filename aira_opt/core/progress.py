"""Progress for long work: numbered steps with timings on stderr, and a bar for loops (tqdm)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import click
from tqdm import tqdm

T = TypeVar("T")


class Steps:
    """Prints `[i/n] what ... done (1.2s)` to stderr so stdout stays clean for --json."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.index, self.quiet = total, 0, quiet

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.index += 1
        start = time.perf_counter()
        if not self.quiet:
            click.echo(f"[{self.index}/{self.total}] {what} ...", err=True)
        yield
        if not self.quiet:
            click.echo(f"      done ({time.perf_counter() - start:.1f}s)", err=True)


def bar(items: Iterable[T], desc: str, total: int | None = None, quiet: bool = False) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, disable=quiet or None, file=sys.stderr, leave=False)
