"""A batch of concurrent requests through our generation loop, with no Triton in sight: what the Triton model
(serve/backend.py) runs on every `execute`, and what tests drive directly.

Each request becomes one row of a left-padded batch with its own sampling, seed and token budget; bad requests
are answered with their error and left out, so they never fail the others. Every row stops at its own eos or
budget, or when its client has gone, and the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from aira_opt.generation.chat import Chat, TextStream, settings_from_folder
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
    """An export folder ready to serve: its tokenizer, prompt format, default options and an active decoder."""

    folder: Path
    decoder: Decoder
    chat: Chat = field(init=False)

    def __post_init__(self) -> None:
        self.chat = Chat(Path(self.folder), self.decoder)
        self.defaults = settings_from_folder(Path(self.folder))
        self.context = int(self.decoder.config.get("max_position_embeddings", 2048))

    def __enter__(self) -> BatchEngine:
        self.chat.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.chat.__exit__(*exc)

    def admit(self, values: dict[str, np.ndarray | None], sink: ResponseSink, stats: ServeStats) -> Row | None:
        """The request as a row of the next batch, or None after answering it with its error."""
        started = time.perf_counter()
        try:
            request = parse_request(values, self.defaults)
            prompt = prompt_ids(self.chat.tokenizer, request.text, self.chat.format)
            request = fit_to_context(request, len(prompt), self.context)
        except BadRequest as exc:
            stats.rejected()
            sink.fail(str(exc))
            return None
        return Row(request, prompt, sink, TextStream(self.chat.tokenizer), started)

    def serve_batch(self, requests: Sequence[tuple[dict[str, np.ndarray | None], ResponseSink]],
                    stats: ServeStats | None = None) -> None:
        """Answer every request: errors at once, the rest as one batch, streamed or whole."""
        stats = stats or NoStats()
        rows = [row for values, sink in requests if (row := self.admit(values, sink, stats)) is not None]
        if not rows:
            return
        stops = set(self.chat.format.stop_ids)

        def on_token(i: int, token: int) -> bool:
            row = rows[i]
            if row.sink.cancelled():
                self._end(row, stats, "", Final(row.tokens, "cancelled"))
                return False
            if row.tokens == 0:
                stats.first_token(time.perf_counter() - row.started)
            row.tokens += 1
            # Only streaming rows detokenize as they go; a whole answer is decoded once, as `generate` does.
            piece = row.text.push(token) if row.request.stream else (row.text.tokens.append(token) or "")
            reason = "stop" if token in stops else "length" if row.tokens >= row.request.options.max_new_tokens else None
            if reason is not None:
                text = piece + row.text.rest() if row.request.stream else decode_answer(self.chat.tokenizer, row.text.tokens)
                self._end(row, stats, text, Final(row.tokens, reason))
                return False
            if row.request.stream:  # one event per token, text or not: clients see progress and time the first
                row.sink.send(piece, Progress(row.tokens))
            return True

        try:
            generate_rows(self.decoder, [r.prompt for r in rows], [r.request.options for r in rows],
                          self.chat.format.stop_ids, self.chat.format.pad_id, on_token)
        except Exception as exc:  # a runtime failure ends this batch's requests with its message, not the server
            log.exception("generation failed")
            message = str(exc).strip().splitlines()
            for row in rows:
                if not row.done:
                    row.done = True
                    row.sink.fail(f"generation failed: {type(exc).__name__}: {message[0] if message else ''}")

    @staticmethod
    def _end(row: Row, stats: ServeStats, text: str, final: Final) -> None:
        row.done = True
        stats.finished(final.generated_tokens, final.finish_reason)
        row.sink.send(text, final)


def describe(engine: BatchEngine) -> dict[str, Any]:
    """What a server log says about the model it serves."""
    return {"folder": str(engine.folder), "provider": engine.decoder.provider, "prompt_format": engine.chat.format.kind,
            "context": engine.context, "defaults": {"max_new_tokens": engine.defaults.max_new_tokens,
                                                    **engine.defaults.sampling.__dict__}}
