"""The Triton Python backend model: the `TritonPythonModel` that a repository's `model.py` re-exports.

It runs inside Triton's Python stub process, where `triton_python_backend_utils` exists; everything it does is
the engine's (serve/engine.py), so this file only moves tensors and responses. The model is decoupled: a request
gets one response (`stream` false, what `/generate` needs) or one per new token with the text it adds, possibly
none yet (`stream` true, for `/generate_stream`); the last is flagged final and carries the finish reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from aira_opt.folders import EngineFolder, ExportFolder
from aira_opt.runners import open_runner
from aira_opt.serve.engine import BatchEngine, Final, Progress, describe
from aira_opt.serve.protocol import INPUTS

log = logging.getLogger(__name__)
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]  # seconds


class TritonSink:
    """One request's response sender."""

    def __init__(self, request: Any, pb: Any):
        self.pb = pb
        self.sender = request.get_response_sender()

    def cancelled(self) -> bool:
        try:
            return bool(self.sender.is_cancelled())
        except Exception:  # a sender that cannot tell is treated as still wanted
            return False

    def _send(self, response: Any | None, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            if response is None:
                self.sender.send(flags=flags)
            else:
                self.sender.send(response, flags=flags)
        except Exception as exc:  # the client left: nothing to tell it, and the batch goes on
            log.info("response not delivered: %s", exc)

    def send(self, text: str, info: Progress) -> None:
        tensors = [self.pb.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
                   self.pb.Tensor("generated_tokens", np.array([[info.generated_tokens]], dtype=np.int32))]
        final = isinstance(info, Final)
        if final:
            tensors.append(self.pb.Tensor("finish_reason", np.array([[info.finish_reason.encode()]], dtype=np.object_)))
        self._send(self.pb.InferenceResponse(output_tensors=tensors), final)

    def fail(self, message: str) -> None:
        self._send(self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message)), True)


class TritonStats:
    """Custom metrics on Triton's Prometheus endpoint, labelled with the model's name."""

    def __init__(self, pb: Any, model: str):
        labels = {"model": model}
        family = pb.MetricFamily
        # The families must outlive their metrics (Triton refuses to observe a metric whose family is gone).
        self.families = {
            "ttft": family(name="aira_time_to_first_token_seconds", kind=family.HISTOGRAM,
                           description="Time from a request entering a batch to its first new token"),
            "tokens": family(name="aira_generated_tokens_total", kind=family.COUNTER,
                             description="New tokens generated, eos included"),
            "requests": family(name="aira_requests_total", kind=family.COUNTER,
                               description="Requests answered, by finish reason (stop, length, cancelled, rejected)"),
        }
        self.ttft = self.families["ttft"].Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.tokens = self.families["tokens"].Metric(labels=labels)
        self.requests = {reason: self.families["requests"].Metric(labels={**labels, "finish_reason": reason})
                         for reason in ("stop", "length", "cancelled", "rejected")}

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, generated_tokens: int, finish_reason: str) -> None:
        self.tokens.increment(generated_tokens)
        self.requests[finish_reason].increment(1)

    def rejected(self) -> None:
        self.requests["rejected"].increment(1)


def _parameters(model_config: dict[str, Any]) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    """Triton's Python backend entry points: initialize, execute (a dynamic batch of requests), finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb  # exists only inside Triton's stub process

        self.pb = pb
        config = json.loads(args["model_config"])
        params = _parameters(config)
        folder = Path(args["model_repository"]) / args["model_version"] / params.get("folder", "model")
        opened = EngineFolder(folder) if params.get("runtime") == "engine" else ExportFolder(folder)
        decoder = open_runner(opened, params.get("provider", "cpu"),
                              int(params["threads"]) if params.get("threads") else None)
        rows = int(config.get("max_batch_size") or 0) or 16
        self.engine = BatchEngine(opened, decoder, TritonStats(pb, config["name"]), max_rows=rows).__enter__()
        self.engine.start()
        pb.Logger.log_info(f"aira-opt serving {json.dumps(describe(self.engine))}")

    def execute(self, requests: list[Any]) -> None:
        """Hand the requests to the engine's running batch and return at once: a decoupled model answers through
        each request's response sender, so Triton can deliver the next requests while these decode."""
        for request in requests:
            values = {}
            for field in INPUTS:
                tensor = self.pb.get_input_tensor_by_name(request, field.name)
                values[field.name] = None if tensor is None else tensor.as_numpy()
            self.engine.submit(values, TritonSink(request, self.pb))
        return None

    def finalize(self) -> None:
        self.engine.__exit__(None, None, None)  # the worker finishes the rows in flight first
