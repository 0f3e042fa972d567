"""An answer's text as its tokens arrive, for streams (the CLI, the Python API's `stream`, serving)."""

from __future__ import annotations

from typing import Any


class TextStream:
    """One sequence's answer text as its tokens arrive: each push returns only what is new, and the pieces add up
    to `decode_answer` of all the tokens.

    Decoding is incremental over a window (as vLLM does it): the text of the tokens since the last release is
    compared with the same window minus the newest token, so a tokenizer that drops a word's leading space at
    the start of a decode, or a byte-level piece that is half a character, never corrupts what was released;
    text is released once it no longer ends mid-character. Surrounding whitespace is held back, as
    `decode_answer` strips it."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # window start: tokens before it are released for good
        self.read = 0  # tokens before this were decoded into released text
        self.held = ""  # whitespace released text ended with: shown once more text follows
        self.shown = ""

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return (decode(self.tokens[self.prefix:self.read], skip_special_tokens=True),
                decode(self.tokens[self.prefix:], skip_special_tokens=True))

    def _release(self, new: str, last: bool) -> str:
        text = self.held + new
        text = text.lstrip() if not self.shown else text
        body = text.rstrip()
        self.held = "" if last else text[len(body):]
        self.shown += body
        return body

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before, now = self._window()
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return self._release(now[len(before):], last=False)

    def rest(self) -> str:
        """What the last pushes held back (the end of a character, say); the stream is then complete."""
        before, now = self._window()
        self.prefix = self.read = len(self.tokens)
        return self._release(now[len(before):] if len(now) > len(before) else "", last=True)
