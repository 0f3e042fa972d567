"""The streaming export: weights read a tensor at a time from the checkpoint give the same graph and the same bytes
as the whole model in memory, for each variant's recipe, and the memory an export needs follows the largest tensor,
not the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from aira_opt.exporting.exporters import EXPORTERS
from aira_opt.precision.streaming import keep_weights, rewrite_by_layer
from aira_opt.precision.variants import VARIANTS
from aira_opt.precision.weight_only import quantize_model, quantize_weight_only
from aira_opt.source.models import PRESETS, bundled_model_dir, load_model
from aira_opt.source.weights import SafetensorsWeights, random_tensor


def graph_and_bytes(path: Path) -> tuple[list, dict[str, np.ndarray]]:
    model = onnx.load(str(path))
    nodes = [(n.name, n.op_type, list(n.input), list(n.output), str(n.attribute)) for n in model.graph.node]
    return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_same(a: Path, b: Path) -> None:
    nodes_a, weights_a = graph_and_bytes(a)
    nodes_b, weights_b = graph_and_bytes(b)
    assert nodes_a == nodes_b
    assert sorted(weights_a) == sorted(weights_b)
    different = [k for k in weights_a if weights_a[k].dtype != weights_b[k].dtype
                 or not np.array_equal(weights_a[k], weights_b[k])]
    assert different == []


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory) -> Path:
    """A small Llama with tied embeddings, saved as a local safetensors folder (the tied head's streaming path)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tied") / "tiny-tied"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def both_graphs(tied_folder, tmp_path_factory) -> dict[str, tuple[Path, Path, Any]]:
    """The fp32 graph of aira-tiny and of the tied model, exported from memory and streamed, with the config."""
    out = tmp_path_factory.mktemp("graphs")
    graphs = {}
    for spec in ("aira-tiny", str(tied_folder)):
        pair = []
        for streamed in (False, True):
            folder = out / Path(spec).name / ("streamed" if streamed else "memory")
            folder.mkdir(parents=True)
            loaded = load_model(spec, streamed=streamed)
            assert (next(loaded.model.parameters()).device.type == "meta") == streamed
            pair.append(EXPORTERS["torch"].export_graph(loaded, folder))
        graphs[Path(spec).name] = (pair[0], pair[1], loaded.config)
    return graphs


@pytest.mark.parametrize("model", ["aira-tiny", "tiny-tied"])
def test_the_streamed_trace_writes_the_same_graph_and_bytes(both_graphs, model):
    memory, streamed, _ = both_graphs[model]
    assert_same(memory, streamed)


@pytest.mark.parametrize("model", ["aira-tiny", "tiny-tied"])
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_a_weight_only_recipe_layer_by_layer_equals_the_whole_graph_recipe(both_graphs, model, precision, tmp_path):
    _, fp32, config = both_graphs[model]
    settings = VARIANTS[precision].weight_only
    whole, record, fusion = quantize_model(onnx.load(str(fp32)), settings, config)
    (tmp_path / "whole").mkdir()
    onnx.save_model(whole, str(tmp_path / "whole" / "model.onnx"))
    (tmp_path / "layers").mkdir()
    by_layer, fused = quantize_weight_only(fp32, tmp_path / "layers" / "model.onnx", settings, config)
    assert_same(tmp_path / "whole" / "model.onnx", tmp_path / "layers" / "model.onnx")
    assert by_layer == record and fused == fusion
    assert record["head"] == "8-bit" and record["quantized_nodes"] > 0


@pytest.mark.parametrize("model", ["aira-tiny", "tiny-tied"])
def test_the_fp16_export_streamed_writes_the_same_graph_and_bytes(tied_folder, model, tmp_path):
    """fp16 is exported from the fp16 model itself: streamed, each weight is cast as it is written."""
    from aira_opt.precision.fp16 import export_fp16

    spec = "aira-tiny" if model == "aira-tiny" else str(tied_folder)
    for streamed in (False, True):
        folder = tmp_path / str(streamed)
        folder.mkdir()
        export_fp16(load_model(spec, streamed=streamed), folder, EXPORTERS["torch"])
    assert_same(tmp_path / "False" / "model.onnx", tmp_path / "True" / "model.onnx")


def test_a_fused_fp32_graph_packed_layer_by_layer_equals_the_whole_graph(both_graphs, tmp_path):
    from aira_opt.precision.fusing import fuse_and_pack

    _, fp32, config = both_graphs["aira-tiny"]
    whole = onnx.load(str(fp32))
    fusion = fuse_and_pack(whole, config)
    (tmp_path / "whole").mkdir()
    onnx.save_model(whole, str(tmp_path / "whole" / "model.onnx"))
    (tmp_path / "layers").mkdir()
    _, fused = rewrite_by_layer(fp32, tmp_path / "layers" / "model.onnx", keep_weights, config)
    assert_same(tmp_path / "whole" / "model.onnx", tmp_path / "layers" / "model.onnx")
    assert fused == fusion and fusion["packed_matmul_groups"] > 0


def test_exports_from_the_cli_stream_and_validate(tied_folder, tmp_path):
    """`aira-opt export` loads streamed for every variant it offers here; the tied model validates as fp16 too."""
    from click.testing import CliRunner

    from aira_opt.cli import main

    for precision in ("fp32", "fp16", "int4"):
        out = tmp_path / precision
        result = CliRunner().invoke(main, ["export", "--model", str(tied_folder), "--precision", precision,
                                           "--output", str(out)])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["validation"]["misses"] == []


def test_preset_tensors_do_not_depend_on_each_other():
    """Each preset tensor has a generator of its own: one layer can be made, or remade, without the rest."""
    a = random_tensor("model.layers.3.mlp.up_proj.weight", (8, 4), seed=1234)
    random_tensor("model.layers.2.mlp.up_proj.weight", (8, 4), seed=1234)
    again = random_tensor("model.layers.3.mlp.up_proj.weight", (8, 4), seed=1234)
    other = random_tensor("model.layers.3.mlp.down_proj.weight", (8, 4), seed=1234)
    assert np.array_equal(a.float().numpy(), again.float().numpy())
    assert not np.array_equal(a.float().numpy(), other.float().numpy())
    assert random_tensor("model.norm.weight", (4,), 1234).float().numpy().tolist() == [1.0] * 4


def test_the_llama3_presets_have_the_real_models_shapes():
    three, eight = PRESETS["llama-3.2-3b-random"], PRESETS["llama-3.1-8b-random"]
    assert 3.20e9 < three.parameter_count() < 3.22e9  # Llama-3.2-3B: 3.21B
    assert 8.02e9 < eight.parameter_count() < 8.04e9  # Llama-3.1-8B: 8.03B
    assert three.tie_word_embeddings and not eight.tie_word_embeddings
    assert three.rope_scaling["rope_type"] == eight.rope_scaling["rope_type"] == "llama3"


def test_a_preset_is_written_once_as_shards_and_loads_streamed(tmp_path, monkeypatch):
    """Llama-3.2-3B's shape cut to one layer (its 128256 x 3072 table is the largest tensor CI writes)."""
    import torch

    monkeypatch.setenv("AIRA_OPT_CACHE", str(tmp_path / "cache"))
    loaded = load_model("llama-3.2-3b-random", num_layers=1, streamed=True)
    assert loaded.config.rope_scaling["rope_type"] == "llama3" and loaded.config.vocab_size == 128256
    folder = next((tmp_path / "cache" / "presets").iterdir())
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model-layer-000.safetensors",
                                                                    "model-other.safetensors"]
    weights = SafetensorsWeights(folder)
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (8192, 3072)
    assert "lm_head.weight" not in weights  # tied: the head reads the table
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert loaded.model.lm_head.weight is loaded.model.get_input_embeddings().weight
    assert loaded.describe()["num_parameters"] == 3072 * 128256 + sum(
        v.numel() for k, v in ((k, weights[k]) for k in weights) if ".layers." in k or "norm" in k)
    with torch.no_grad():  # a forward swaps the streamed parameters: the count stays the model's
        loaded.model(torch.tensor([[1, 2, 3]]))
    assert loaded.describe()["num_parameters"] == 3072 * 128256 + sum(
        v.numel() for k, v in ((k, weights[k]) for k in weights) if ".layers." in k or "norm" in k)
    assert loaded.extra["seed"] == 1234 and loaded.checkpoint == folder


MEMORY_PROBE = """
import json, sys
from pathlib import Path
from aira_opt.exporting.exporters import EXPORTERS
from aira_opt.source.models import load_model

loaded = load_model("aira-2-1b1-random", num_layers=int(sys.argv[3]), streamed=sys.argv[2] == "streamed")
EXPORTERS["torch"].export_graph(loaded, Path(sys.argv[1]))
# this process's peak resident bytes (VmHWM; ru_maxrss would include the parent's, inherited through fork)
line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"peak": int(line.split()[1]) * 1024, "fp32": (Path(sys.argv[1]) / "model.onnx_data").stat().st_size}))
"""


@pytest.mark.slow
def test_a_streamed_exports_memory_does_not_grow_with_the_model(tmp_path):
    """Aira-2-1B1's shape at 1 and at 4 layers: three more layers add 0.53 GB of fp32 weights. Loaded whole, the
    export's peak grows by at least that much; streamed, by less than a fifth of it (what it holds at once is
    one tensor, the largest being the embedding and head, the same at both depths)."""
    peaks = {}
    for mode in ("memory", "streamed"):
        for layers in (1, 4):
            out = tmp_path / f"{mode}-{layers}"
            out.mkdir()
            done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(out), mode, str(layers)],
                                  capture_output=True, text=True, check=True)
            peaks[mode, layers] = json.loads(done.stdout.strip().splitlines()[-1])
    added = peaks["streamed", 4]["fp32"] - peaks["streamed", 1]["fp32"]  # bytes of three layers' weights
    assert added > 0.5e9
    assert peaks["memory", 4]["peak"] - peaks["memory", 1]["peak"] > added, peaks
    assert peaks["streamed", 4]["peak"] - peaks["streamed", 1]["peak"] < 0.2 * added, peaks
    assert peaks["streamed", 4]["peak"] < peaks["memory", 4]["peak"] - added, peaks


def test_an_export_run_in_pieces_gives_the_whole_sessions_logits(tiny, tiny_export):
    """Validation's way to run a large standard-op export: consecutive pieces of its graph, one session at a
    time; with a budget small enough to cut aira-tiny into several pieces, the logits equal one session's."""
    from aira_opt.folders import ExportFolder
    from aira_opt.pipeline.validation import case_logits, case_steps
    from aira_opt.runtime.ort import OrtDecoder
    from aira_opt.runtime.pieces import run_in_pieces, split
    from aira_opt.source.prompts import ordinary_token_ids

    folder = ExportFolder(tiny_export)
    steps = case_steps(ordinary_token_ids(tiny.tokenizer, len(tiny.tokenizer)))
    budget = 200_000  # aira-tiny's 2.7 MB of weights: a dozen pieces
    assert len(split(onnx.load(str(folder.model_path), load_external_data=False), budget)) > 5
    with OrtDecoder(folder) as whole:
        expected = list(case_logits(whole, steps))
    pieces = run_in_pieces(folder, [step for _, step in steps], budget=budget)
    assert len(pieces) == len(expected) == 12
    for want, got in zip(expected, pieces):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert not list(folder.path.glob(".pieces-*"))  # the scratch folder is gone
