"""Concurrent requests through our generation loop, with no Triton in sight: what the Triton model
(serve/backend.py) feeds, and what tests drive directly.

Requests are batched at every decode step (continuous batching: the generator's compact policy,
generation/generator.py): a request joins the running batch at the next step and leaves it when it ends, each row
with its own sampling, seed and token budget. Bad requests are answered with their error at once and never reach
the batch. A row ends at its own eos or budget, or when its client has gone, and the rest go on. A runner that
cannot move its cache to the host (the TensorRT one) takes newcomers only once the running batch has ended.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aira_opt.folders import EngineFolder, ExportFolder, open_folder
from aira_opt.generation.defaults import generate_options
from aira_opt.generation.generator import Generator
from aira_opt.generation.generator import Row as GeneratorRow
from aira_opt.generation.streaming import TextStream
from aira_opt.runtime.protocol import Decoder
from aira_opt.serve.protocol import BadRequest, GenerateRequest, fit_to_context, parse_request
from aira_opt.source.prompts import decode_answer, prompt_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """What a streamed response says besides its text: the tokens generated so far (a token may add no text yet:
    half a character, or a special token)."""

    generated_tokens: int


@dataclass(frozen=True)
class Final(Progress):
    """The last response of a request: also why it ended."""

    finish_reason: str  # one of protocol.FINISH_REASONS


class ResponseSink(Protocol):
    """Where one request's answer goes (Triton's response sender, or a test's list)."""

    def cancelled(self) -> bool: ...

    def send(self, text: str, info: Progress) -> None: ...

    def fail(self, message: str) -> None: ...


class ServeStats(Protocol):
    """What the server counts (Triton custom metrics, or a test's counters)."""

    def first_token(self, seconds: float) -> None: ...

    def finished(self, generated_tokens: int, finish_reason: str) -> None: ...

    def rejected(self) -> None: ...


class NoStats:
    def first_token(self, seconds: float) -> None:
        pass

    def finished(self, generated_tokens: int, finish_reason: str) -> None:
        pass

    def rejected(self) -> None:
        pass


@dataclass
class Request:
    """One admitted request while its batch runs."""

    request: GenerateRequest
    prompt: list[int]
    sink: ResponseSink
    text: TextStream
    started: float
    done: bool = False
    tokens: int = 0


@dataclass
class BatchEngine:
    """An export folder ready to serve: its tokenizer, prompt format, default options and an active decoder.

    `submit` takes requests from any thread; `run_until_idle` serves them on the caller's thread, or `start`
    serves them on a worker thread until `stop`."""

    folder: Path | ExportFolder | EngineFolder
    decoder: Decoder
    stats: ServeStats = field(default_factory=lambda: NoStats())
    max_rows: int = 16  # most requests decoding at once; the others wait for a row to free up

    def __post_init__(self) -> None:
        self.folder = open_folder(self.folder)
        self.tokenizer = self.folder.tokenizer
        self.format = self.folder.prompt_format
        self.defaults = generate_options(self.folder.generation_config)
        self.context = self.folder.context_length
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.in_batch: list[Request] = []  # the requests the running batch holds (answered if a step fails)
        self.worker: threading.Thread | None = None
        self.stopping = threading.Event()

    def __enter__(self) -> BatchEngine:
        self.decoder.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.decoder.deactivate()

    # Requests in ------------------------------------------------------------------------------------------
    def submit(self, values: dict[str, np.ndarray | None], sink: ResponseSink) -> None:
        """Validate a request: an error is answered at once, a good request waits for the next step."""
        started = time.perf_counter()
        try:
            request = parse_request(values, self.defaults)
            prompt = prompt_ids(self.tokenizer, request.text, self.format)
            request = fit_to_context(request, len(prompt), self.context)
        except BadRequest as exc:
            self.stats.rejected()
            sink.fail(str(exc))
            return
        self.waiting.put(Request(request, prompt, sink, TextStream(self.tokenizer), started))

    def serve_batch(self, requests: Sequence[tuple[dict[str, np.ndarray | None], ResponseSink]]) -> None:
        """Answer these requests (and any others waiting) on this thread."""
        for values, sink in requests:
            self.submit(values, sink)
        self.run_until_idle()

    # The scheduler ----------------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        batch = self._new_batch()
        try:
            while self._step(batch, block=False):
                pass
        finally:
            self.in_batch = []

    def start(self) -> None:
        """Serve on a worker thread until `stop` (which lets the rows in flight finish first)."""
        self.worker = threading.Thread(target=self._serve_forever, name="aira-opt-engine", daemon=True)
        self.worker.start()

    def stop(self) -> None:
        if self.worker is not None:
            self.stopping.set()
            self.waiting.put(None)  # type: ignore[arg-type] - wakes a worker waiting for work
            self.worker.join()
            self.worker = None

    def _serve_forever(self) -> None:
        batch = self._new_batch()
        while not (self.stopping.is_set() and batch.active == 0 and self.waiting.empty()):
            try:
                self._step(batch, block=True)
            except Exception:  # the step's rows were answered with the error; the server goes on
                log.exception("serving step failed")
                batch = self._new_batch()

    def _new_batch(self) -> Generator:
        """The running batch: compact (rows join and leave between steps) where the runner can move its cache."""
        return Generator(self.decoder, self.format.stop_ids, self.format.pad_id, compact=True)

    def _take(self, most: int, block: bool = False) -> list[Request]:
        rows: list[Request] = []
        while len(rows) < most:
            try:
                row = self.waiting.get(block=block and not rows, timeout=None)
            except queue.Empty:
                break
            if row is None:  # stop's wake-up
                break
            rows.append(row)
        return rows

    def _step(self, batch: Generator, block: bool) -> bool:
        """Let waiting requests join (blocking for one when the batch is empty and `block`), then one decode step.
        A runner without host cache access takes newcomers only into an empty batch. False when there was
        nothing to do."""
        room = self.max_rows - batch.active if batch.compact or batch.active == 0 else 0
        newcomers = self._take(room, block=block and batch.active == 0)
        if not newcomers and batch.active == 0:
            return False
        self.in_batch = [row for row in self.in_batch if not row.done] + newcomers
        try:
            rows = [GeneratorRow(r.prompt, r.request.options, lambda t, r=r: self._on_token(r, t)) for r in newcomers]
            capacity = max((len(r.prompt) + r.options.max_new_tokens for r in rows), default=None)
            batch.add(rows, capacity)
            batch.step()
        except Exception as exc:
            self._fail_all(self.in_batch, exc)
            raise
        return True

    # Tokens out -------------------------------------------------------------------------------------------
    def _on_token(self, row: Request, token: int) -> bool:
        """Hand one token to its request; False when the request is over (eos, budget, or its client left)."""
        if row.sink.cancelled():
            self._end(row, "", Final(row.tokens, "cancelled"))
            return False
        if row.tokens == 0:
            self.stats.first_token(time.perf_counter() - row.started)
        row.tokens += 1
        # Only streaming rows detokenize as they go; a whole answer is decoded once, as `generate` does.
        piece = row.text.push(token) if row.request.stream else (row.text.tokens.append(token) or "")
        at_eos = token in self.format.stop_ids and not row.request.options.ignore_eos
        reason = "stop" if at_eos else "length" if row.tokens >= row.request.options.max_new_tokens else None
        if reason is not None:
            text = piece + row.text.rest() if row.request.stream else decode_answer(self.tokenizer, row.text.tokens)
            self._end(row, text, Final(row.tokens, reason))
            return False
        if row.request.stream:  # one event per token, text or not: clients see progress and time the first
            row.sink.send(piece, Progress(row.tokens))
        return True

    def _end(self, row: Request, text: str, final: Final) -> None:
        row.done = True
        self.stats.finished(final.generated_tokens, final.finish_reason)
        row.sink.send(text, final)

    @staticmethod
    def _fail_all(rows: Sequence[Request | None], exc: Exception) -> None:
        """A runtime failure ends the affected requests with its message, not the server (the caller logs it)."""
        message = str(exc).strip().splitlines()
        for row in rows:
            if row is not None and not row.done:
                row.done = True
                row.sink.fail(f"generation failed: {type(exc).__name__}: {message[0] if message else ''}")


def describe(engine: BatchEngine) -> dict[str, Any]:
    """What a server log says about the model it serves."""
    return {"folder": str(engine.folder.path), "provider": engine.decoder.provider, "prompt_format": engine.format.kind,
            "context": engine.context, "defaults": {"max_new_tokens": engine.defaults.max_new_tokens,
                                                    **engine.defaults.sampling.__dict__}}
