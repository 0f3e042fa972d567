"""Questions in, answers out: the user-facing layer over the generation loop (tokenizer, template, streaming)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aira_opt.core.errors import AiraOptError, ExportFolderError
from aira_opt.export.support import read_format, read_generation_config
from aira_opt.generation.loop import GenerateOptions, GenerationResult, generate
from aira_opt.generation.sampling import SamplingSettings
from aira_opt.runtime.decoder import Decoder
from aira_opt.spec.models import CARD_GENERATION_DEFAULTS
from aira_opt.spec.prompts import decode_answer, prompt_ids

DEFAULT_MAX_NEW_TOKENS = 256  # for a model whose generation config names none (transformers' own is a bare 20)


def settings_from_folder(folder: Path, greedy: bool = False, seed: int | None = None, num_return_sequences: int = 1,
                         max_new_tokens: int | None = None, temperature: float | None = None,
                         top_k: int | None = None, top_p: float | None = None,
                         repetition_penalty: float | None = None) -> GenerateOptions:
    """Options from the folder's generation_config.json (the source model's own defaults, written by the export),
    overridden by the user. What it leaves out takes transformers' defaults (no sampling processors, greedy); a
    folder without one (made by hand) gets Aira's model-card defaults."""
    defaults = read_generation_config(folder) or dict(CARD_GENERATION_DEFAULTS)
    neutral = {**asdict(SamplingSettings()), "max_new_tokens": DEFAULT_MAX_NEW_TOKENS}

    def pick(value: Any, key: str) -> Any:
        return value if value is not None else defaults.get(key, neutral[key])

    sampling = SamplingSettings(
        do_sample=not greedy and bool(defaults.get("do_sample", False)), temperature=float(pick(temperature, "temperature")),
        top_k=int(pick(top_k, "top_k")), top_p=float(pick(top_p, "top_p")),
        repetition_penalty=float(pick(repetition_penalty, "repetition_penalty")),
    )
    problems = sampling.validate()
    if problems:
        raise AiraOptError("; ".join(problems))
    return GenerateOptions(max_new_tokens=int(pick(max_new_tokens, "max_new_tokens")), sampling=sampling, seed=seed,
                           num_return_sequences=num_return_sequences, fit_context=max_new_tokens is None)


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


class Chat:
    """A model folder ready to answer: its tokenizer, its recorded prompt format, and a decoder (ONNX Runtime or
    TensorRT)."""

    def __init__(self, folder: Path, decoder: Decoder):
        from transformers import AutoTokenizer  # heavy: only once a folder is opened

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ExportFolderError(f"'{folder}' has no loadable tokenizer: {str(exc).splitlines()[0]}") from exc
        self.format = read_format(folder, self.tokenizer)
        self.decoder = decoder

    def __enter__(self) -> Chat:
        self.decoder.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.decoder.deactivate()

    def run(self, questions: list[str], options: GenerateOptions,
            on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
        tok = self.tokenizer
        prompts = [prompt_ids(tok, q, self.format) for q in questions]
        return generate(self.decoder, prompts, options, self.format.stop_ids, self.format.pad_id, on_token=on_token)

    def answer(self, question: str, options: GenerateOptions) -> dict[str, Any]:
        """One question -> the JSON object `generate --json` prints."""
        result = self.run([question], options)
        new_tokens = sum(len(t) for t in result.tokens)
        return {
            "prompt": question,
            "answers": [decode_answer(self.tokenizer, t) for t in result.tokens],
            "token_ids": result.tokens,
            "prompt_token_ids": result.prompts[0],
            "finished_at_eos": result.finished,
            "time_to_first_token_ms": round(result.ttft_ms, 3),
            "tokens_per_second": round(result.decode_tokens_per_s, 3),
            "new_tokens": new_tokens,
        }

    def stream(self, question: str, options: GenerateOptions, echo: Callable[..., None]) -> GenerationResult:
        """Print the answer as tokens arrive (one sequence), or each answer when several are asked for."""
        tok = self.tokenizer
        if options.num_return_sequences > 1:
            result = self.run([question], options)
            for i, tokens in enumerate(result.tokens, 1):
                echo(f"[{i}] {decode_answer(tok, tokens)}")
            return result
        text = TextStream(tok)

        def on_token(_row: int, token: int) -> None:
            echo(text.push(token), nl=False)

        result = self.run([question], options, on_token=on_token)
        echo(text.rest())
        return result
