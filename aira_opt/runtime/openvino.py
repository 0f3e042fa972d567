"""OpenVINO as a peer, in an environment of its own: openvino-genai and optimum-intel move torch and transformers,
so they live in another virtual environment whose python aira-opt drives (`--openvino-python`, or
$AIRA_OPT_OPENVINO_PYTHON; this one when openvino imports here).

`eval` reads every position's logits from optimum-intel's OVModelForCausalLM over an IR folder (what
`optimum-cli export openvino` writes), through a child process in that environment: ids go in as a JSON line, the
logits come back in an .npy file the child overwrites. `bench` runs OpenVINO GenAI's LLMPipeline
(benchmark/backends.py) under the same interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from aira_opt.core.errors import AiraOptError, MissingExtraError
from aira_opt.core.processes import source_tree_env

PYTHON_ENV = "AIRA_OPT_OPENVINO_PYTHON"
INSTALL = ("pip install openvino-genai optimum-intel in a virtual environment of its own (they move torch and "
           "transformers), with aira-opt's own dependencies, and pass its python with --openvino-python or "
           f"${PYTHON_ENV}")


def openvino_python(given: str | None = None) -> str:
    """The interpreter that runs OpenVINO: the one given, $AIRA_OPT_OPENVINO_PYTHON, or this one when openvino
    imports here; else a MissingExtraError that says how to get one."""
    python = given or os.environ.get(PYTHON_ENV)
    if python:
        if not Path(python).exists():
            raise AiraOptError(f"--openvino-python {python}: no such interpreter")
        return python
    if importlib.util.find_spec("openvino_genai") is not None:
        return sys.executable
    raise MissingExtraError("--openvino (OpenVINO)", "openvino", INSTALL)


class OpenVinoLogits:
    """An IR folder held by a child process in the OpenVINO environment: [T] ids -> [T, V] logits."""

    def __init__(self, folder: Path, python: str, threads: int | None):
        self.scratch = tempfile.TemporaryDirectory(prefix="aira-opt-openvino-")
        self.out = Path(self.scratch.name) / "logits.npy"
        # The child's chatter goes to a file, not a pipe nobody reads (a full pipe would stall it).
        self.log = open(Path(self.scratch.name) / "stderr.log", "w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([python, "-m", "aira_opt.runtime.openvino", str(folder), str(threads or 0)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=source_tree_env())
        self.info = self._reply()  # the model loaded, or its one-line error

    def _reply(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.log.seek(0)
            last = (self.log.read().strip().splitlines() or [f"exit code {code}"])[-1]
            self.close()
            raise AiraOptError(f"OpenVINO child: {last}")
        reply = json.loads(line)
        if "error" in reply:
            self.close()
            raise AiraOptError(f"OpenVINO: {reply['error']}")
        return reply

    def logits(self, ids: list[int]) -> np.ndarray:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "out": str(self.out)}) + "\n")
        self.proc.stdin.flush()
        self._reply()
        return np.load(self.out)

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        self.scratch.cleanup()


def serve_logits(folder: str, threads: int) -> None:
    """The child: load the IR once with optimum-intel, then answer one JSON line per window."""
    reply = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # library chatter must not reach the protocol
    try:
        import openvino
        import torch
        from optimum.intel import OVModelForCausalLM

        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        model = OVModelForCausalLM.from_pretrained(folder, ov_config=config, use_cache=True)
    except Exception as exc:  # noqa: BLE001 - one line to the parent
        reply.write(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
                    + "\n")
        reply.flush()
        return
    precision = model.request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
    reply.write(json.dumps({"openvino": openvino.__version__, "inference_precision": str(precision)}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        ids = torch.tensor([request["ids"]], dtype=torch.int64)  # [1, T]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))  # no past: the state starts afresh
        np.save(request["out"], out.logits[0].float().numpy())  # [T, V]
        reply.write('{"ok": true}\n')
        reply.flush()


if __name__ == "__main__":
    serve_logits(sys.argv[1], int(sys.argv[2]))
