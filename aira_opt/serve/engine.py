"""Concurrent requests through our generation loop, with no Triton in sight: what the Triton model
(serve/backend.py) feeds, and what tests drive directly.

Requests are batched at every decode step (continuous batching, generation/continuous.py): a request joins the
running batch at the next step and leaves it when it ends, each row with its own sampling, seed and token budget.
Bad requests are answered with their error at once and never reach the batch. A row ends at its own eos or
budget, or when its client has gone, and the rest go on. A runner that cannot move its cache to the host (the
TensorRT one) gets the same requests batched per arrival instead (generate_rows).
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

from aira_opt.generation.chat import Chat, TextStream, settings_from_folder
from aira_opt.generation.continuous import ContinuousBatch, Sequence_, supports_continuous
from aira_opt.generation.loop import generate_rows
from aira_opt.runtime.decoder import Decoder
from aira_opt.serve.protocol import BadRequest, GenerateRequest, fit_to_context, parse_request
from aira_opt.spec.prompts import decode_answer, prompt_ids

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
class Row:
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

    folder: Path
    decoder: Decoder
    stats: ServeStats = field(default_factory=lambda: NoStats())
    max_rows: int = 16  # most requests decoding at once; the others wait for a row to free up
    chat: Chat = field(init=False)

    def __post_init__(self) -> None:
        self.chat = Chat(Path(self.folder), self.decoder)
        self.defaults = settings_from_folder(Path(self.folder))
        self.context = int(self.decoder.config.get("max_position_embeddings", 2048))
        self.continuous = supports_continuous(self.decoder)
        self.waiting: queue.Queue[Row] = queue.Queue()
        self.in_batch: list[Row] = []  # the requests the running batch holds (answered if a step fails)
        self.worker: threading.Thread | None = None
        self.stopping = threading.Event()

    def __enter__(self) -> BatchEngine:
        self.chat.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.chat.__exit__(*exc)

    # Requests in ------------------------------------------------------------------------------------------
    def submit(self, values: dict[str, np.ndarray | None], sink: ResponseSink) -> None:
        """Validate a request: an error is answered at once, a good request waits for the next step."""
        started = time.perf_counter()
        try:
            request = parse_request(values, self.defaults)
            prompt = prompt_ids(self.chat.tokenizer, request.text, self.chat.format)
            request = fit_to_context(request, len(prompt), self.context)
        except BadRequest as exc:
            self.stats.rejected()
            sink.fail(str(exc))
            return
        self.waiting.put(Row(request, prompt, sink, TextStream(self.chat.tokenizer), started))

    def serve_batch(self, requests: Sequence[tuple[dict[str, np.ndarray | None], ResponseSink]]) -> None:
        """Answer these requests (and any others waiting) on this thread."""
        for values, sink in requests:
            self.submit(values, sink)
        self.run_until_idle()

    # The scheduler ----------------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        batch = self._new_batch()
        try:
            while self._work(batch, block=False):
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
        while not (self.stopping.is_set() and (batch is None or batch.active == 0) and self.waiting.empty()):
            try:
                self._work(batch, block=True)
            except Exception:  # the step's rows were answered with the error; the server goes on
                log.exception("serving step failed")
                batch = self._new_batch()

    def _new_batch(self) -> ContinuousBatch | None:
        """A running batch, or None for a runner that can only batch per arrival."""
        if not self.continuous:
            return None
        return ContinuousBatch(self.decoder, self.chat.format.stop_ids, self.chat.format.pad_id)

    def _work(self, batch: ContinuousBatch | None, block: bool) -> bool:
        """One decode step of the running batch, or one whole per-arrival batch; False when there was nothing."""
        if batch is not None:
            return self._step(batch, block)
        rows = self._take(self.max_rows, block=block)
        self._run_rows(rows)
        return bool(rows)

    def _take(self, most: int, block: bool = False) -> list[Row]:
        rows: list[Row] = []
        while len(rows) < most:
            try:
                row = self.waiting.get(block=block and not rows, timeout=None)
            except queue.Empty:
                break
            if row is None:  # stop's wake-up
                break
            rows.append(row)
        return rows

    def _step(self, batch: ContinuousBatch, block: bool) -> bool:
        """Let waiting rows join (blocking for one when the batch is empty and `block`), then one decode step.
        False when there was nothing to do."""
        newcomers = self._take(self.max_rows - batch.active, block=block and batch.active == 0)
        if not newcomers and batch.active == 0:
            return False
        self.in_batch = [row for row in self.in_batch if not row.done] + newcomers
        try:
            batch.add([Sequence_(row.prompt, row.request.options, lambda t, row=row: self._on_token(row, t))
                       for row in newcomers])
            batch.step()
        except Exception as exc:
            self._fail_all(self.in_batch, exc)
            raise
        return True

    def _run_rows(self, rows: list[Row]) -> None:
        """Request-level batching, for runners without host cache access: one left-padded batch to its end."""
        if not rows:
            return
        try:
            generate_rows(self.decoder, [r.prompt for r in rows], [r.request.options for r in rows],
                          self.chat.format.stop_ids, self.chat.format.pad_id,
                          lambda i, token: self._on_token(rows[i], token))
        except Exception as exc:
            self._fail_all(rows, exc)
            raise

    # Tokens out -------------------------------------------------------------------------------------------
    def _on_token(self, row: Row, token: int) -> bool:
        """Hand one token to its request; False when the request is over (eos, budget, or its client left)."""
        if row.sink.cancelled():
            self._end(row, "", Final(row.tokens, "cancelled"))
            return False
        if row.tokens == 0:
            self.stats.first_token(time.perf_counter() - row.started)
        row.tokens += 1
        # Only streaming rows detokenize as they go; a whole answer is decoded once, as `generate` does.
        piece = row.text.push(token) if row.request.stream else (row.text.tokens.append(token) or "")
        at_eos = token in self.chat.format.stop_ids and not row.request.options.ignore_eos
        reason = "stop" if at_eos else "length" if row.tokens >= row.request.options.max_new_tokens else None
        if reason is not None:
            text = piece + row.text.rest() if row.request.stream else decode_answer(self.chat.tokenizer, row.text.tokens)
            self._end(row, text, Final(row.tokens, reason))
            return False
        if row.request.stream:  # one event per token, text or not: clients see progress and time the first
            row.sink.send(piece, Progress(row.tokens))
        return True

    def _end(self, row: Row, text: str, final: Final) -> None:
        row.done = True
        self.stats.finished(final.generated_tokens, final.finish_reason)
        row.sink.send(text, final)

    @staticmethod
    def _fail_all(rows: Sequence[Row | None], exc: Exception) -> None:
        """A runtime failure ends the affected requests with its message, not the server (the caller logs it)."""
        message = str(exc).strip().splitlines()
        for row in rows:
            if row is not None and not row.done:
                row.done = True
                row.sink.fail(f"generation failed: {type(exc).__name__}: {message[0] if message else ''}")


def describe(engine: BatchEngine) -> dict[str, Any]:
    """What a server log says about the model it serves."""
    return {"folder": str(engine.folder), "provider": engine.decoder.provider, "prompt_format": engine.chat.format.kind,
            "context": engine.context, "defaults": {"max_new_tokens": engine.defaults.max_new_tokens,
                                                    **engine.defaults.sampling.__dict__}}
