"""The CPU attention fusion (GroupQueryAttention + RotaryEmbedding) computes what the exported graph computes."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from aira_opt.cli import main
from aira_opt.core.contract import DecoderContract
from aira_opt.precision.fusing import FusionError, fuse_attention
from aira_opt.generation.generator import generate
from aira_opt.precision.variants import VARIANTS, variant_name
from aira_opt.source.prompts import prompt_ids
from aira_opt.core.contract import position_ids_from_mask
from aira_opt.runtime.ort import OrtDecoder

from helpers import GREEDY, QUESTIONS, hf_greedy


def op_counts(folder: Path) -> collections.Counter:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return collections.Counter(n.op_type for n in model.graph.node)


def test_fused_graph_has_one_attention_op_per_layer_and_keeps_the_contract(tiny, tiny_export, tiny_fused):
    ops, layers = op_counts(tiny_fused), tiny.config.num_hidden_layers
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["Softmax"] == 0 and sum(ops.values()) < sum(op_counts(tiny_export).values()) / 3
    # q/k/v and gate/up packed: per layer qkv, o, gate_up, down, plus lm_head; one Split per packed group
    assert ops["MatMul"] == 4 * layers + 1 and ops["Split"] == 2 * layers
    # every residual Add went into a SkipSimplifiedLayerNormalization with the norm after it
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    contract = DecoderContract.from_config(tiny.config)
    model = onnx.load(str(tiny_fused / "model.onnx"))
    assert contract.check_graph(model) == []
    graph = json.loads((tiny_fused / "manifest.json").read_text())["graph"]
    assert graph["fused"] is True and graph["layers"] == layers


def test_inspect_and_onnx_metadata_say_the_graph_is_fused(tiny_export, tiny_fused):
    fused = json.loads(CliRunner().invoke(main, ["inspect", str(tiny_fused), "--json", "-"]).output)
    assert fused["graph"]["fused"] is True and fused["hashes_ok"]
    assert "GroupQueryAttention" in fused["metadata"]["aira_opt.graph"]
    standard = json.loads(CliRunner().invoke(main, ["inspect", str(tiny_export), "--json", "-"]).output)
    assert standard["graph"] == {"fused": False} and standard["metadata"]["aira_opt.graph"] == "standard attention"


def test_fused_graph_equals_the_exported_graph_on_a_left_padded_batch_with_decode_steps(tiny, tiny_export, tiny_fused):
    contract = DecoderContract.from_config(tiny.config)
    plain = ort.InferenceSession(str(tiny_export / "model.onnx"), providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(str(tiny_fused / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(5, tiny.config.vocab_size, (2, 9))                      # input_ids: [B, S]
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0                                                             # row 1 is left-padded
    past = {n: np.zeros((2, contract.num_kv_heads, 0, contract.head_dim), np.float32) for n in contract.past_names()}
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask, 9), **past}
    for _ in range(4):  # prefill, then three decode steps
        want, got = plain.run(None, feeds), fused.run(None, feeds)
        real = mask.astype(bool)                                                # [B, T]: not padding
        new = real[:, -feeds["input_ids"].shape[1]:]                            # [B, S]
        # Padding positions are never attended to, so what a graph computes there is its own business (the
        # exporters' masks differ there); every real position must agree.
        assert want[0].shape == got[0].shape and np.abs(want[0] - got[0])[new].max() < 1e-4, "logits"
        for name, a, b in zip(contract.present_names(), want[1:], got[1:]):
            assert a.shape == b.shape, name
            assert np.abs(a - b).transpose(0, 2, 1, 3)[real].max() < 1e-4, name  # [B, T, kv, D] at real T
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        feeds = {"input_ids": want[0][:, -1].argmax(-1)[:, None], "attention_mask": mask,
                 "position_ids": position_ids_from_mask(mask, 1),
                 **dict(zip(contract.past_names(), want[1:]))}


def test_our_loop_on_the_fused_graph_matches_transformers_and_batches_like_one_by_one(tiny, tiny_fused):
    tok = tiny.tokenizer
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    with OrtDecoder(tiny_fused) as decoder:
        one_by_one = [generate(decoder, [p], GREEDY, tok.eos_token_id, tok.pad_token_id).tokens[0] for p in prompts]
        assert one_by_one == [hf_greedy(tiny, p, GREEDY.max_new_tokens) for p in prompts]
        batched = generate(decoder, prompts, GREEDY, tok.eos_token_id, tok.pad_token_id).tokens
        assert batched == one_by_one


def test_fusing_a_fused_graph_is_a_typed_error(tiny, tiny_fused):
    model = onnx.load(str(tiny_fused / "model.onnx"))
    with pytest.raises(FusionError, match="already fused"):
        fuse_attention(model, tiny.config)


def test_cpu_variants_are_fused_by_default_and_tensorrt_variants_never(tiny_variants):
    for precision in ("int8", "int4"):
        assert op_counts(tiny_variants[precision])["GroupQueryAttention"] > 0, precision
    for precision in ("fp16", "int8-qdq"):
        ops = op_counts(tiny_variants[precision])
        assert ops["GroupQueryAttention"] == 0 and ops["RotaryEmbedding"] == 0, precision


def test_no_fuse_keeps_int4_standard_attention_and_fuse_is_refused_for_tensorrt_variants(tmp_path):
    runner = CliRunner()
    out = tmp_path / "int4-unfused"
    result = runner.invoke(main, ["export", "--model", "aira-tiny", "--precision", "int4", "--no-fuse",
                                  "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert op_counts(out)["GroupQueryAttention"] == 0 and op_counts(out)["MatMulNBits"] > 0
    assert json.loads((out / "manifest.json").read_text())["graph"] == {"fused": False}
    refused = runner.invoke(main, ["export", "--model", "aira-tiny", "--precision", "fp16", "--fuse",
                                   "--output", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "stays standard-op" in refused.output
    assert not (tmp_path / "x").exists()


def test_a_fused_graph_cannot_go_to_tensorrt(tiny, tiny_fused):
    from aira_opt.tensorrt.build_plan import BuildOptions, derive_profiles, make_plan, preflight
    from aira_opt.core.errors import AiraOptError

    with pytest.raises(AiraOptError, match="without --fuse"):
        make_plan(tiny_fused, BuildOptions(max_context=512))
    contract = DecoderContract.from_config(tiny.config)
    profiles = derive_profiles(contract, BuildOptions(max_seq=64, max_context=512))
    model = onnx.load(str(tiny_fused / "model.onnx"))
    assert any("com.microsoft.GroupQueryAttention" in p for p in preflight(model, contract, profiles, "fp32", {}))


def test_variant_names_say_what_differs_from_the_precision_default():
    assert variant_name("int4") == "int4" and variant_name("int4", 32, True) == "int4"
    assert variant_name("int4", 128, True) == "int4-b128"
    assert variant_name("int4", None, False) == "int4-unfused"
    assert variant_name("fp32", None, True) == "fp32-fused" and variant_name("fp32", None, False) == "fp32"
    assert variant_name("int8-dynamic", None, False) == "int8-dynamic"
    int4 = VARIANTS["int4"]
    assert int4.folder_name(int4.settings(lm_head="int4")) == "int4-head4"
    assert int4.folder_name(int4.settings(128, "float", "gptq", False)) == "int4-b128-headfloat-gptq-regrid"
    assert int4.folder_name(int4.settings(lm_head="int8", algorithm="rtn", source_grid=True)) == "int4"


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16", "--lm-head", "int4"], "--lm-head applies to --precision int8, int4 or int4-cuda only"),
    (["--precision", "int8", "--algorithm", "hqq"], "--algorithm hqq is a 4-bit algorithm"),
    (["--precision", "int8", "--lm-head", "float", "--kernels", "dynamic"], "not a choice for int8 with --lm-head"),
])
def test_recipe_options_that_do_not_apply_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["export", "--output", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_fused_graph_writes_a_preallocated_cache_in_place_and_matches_the_growing_cache(tiny, tiny_fused):
    ids = np.array([prompt_ids(tiny.tokenizer, "What do bees make?")])           # input_ids: [1, S]
    mask = np.ones_like(ids)
    with OrtDecoder(tiny_fused) as decoder:
        growing = decoder.empty_cache(1)
        fixed = decoder.empty_cache(1, capacity=ids.shape[1] + 2)  # prefill + 2 decode steps
        assert fixed.capacity == ids.shape[1] + 2 and fixed.values[0].shape()[2] == fixed.capacity
        pointers = [v.data_ptr() for v in fixed.values]
        assert len(set(pointers)) == len(pointers)  # one buffer per layer and kind
        x = ids
        for _ in range(3):
            positions = position_ids_from_mask(mask, x.shape[1])
            a, growing = decoder.step(x, mask, positions, growing)
            b, fixed = decoder.step(x, mask, positions, fixed)
            assert np.abs(a.logits - b.logits).max() < 1e-4
            assert [v.data_ptr() for v in fixed.values] == pointers  # written in place, never reallocated
            x = a.logits.argmax(-1)[:, None]
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        with pytest.raises(ValueError, match="capacity"):
            decoder.step(x, mask, position_ids_from_mask(mask, 1), fixed)


def test_a_standard_graph_grows_its_cache_within_the_capacity(tiny_decoder):
    cache = tiny_decoder.empty_cache(1, capacity=4)
    assert not cache.in_place and cache.values[0].shape()[2] == 0
    ids = np.array([[1, 50, 60, 3]])                                            # input_ids: [1, 4]
    mask = np.ones_like(ids)
    _, cache = tiny_decoder.step(ids, mask, position_ids_from_mask(mask, 4), cache)
    assert cache.length == 4 and cache.values[0].shape()[2] == 4  # grown, not preallocated
    mask = np.ones((1, 5), np.int64)
    with pytest.raises(ValueError, match="capacity"):  # the cache owns its bound, whichever policy it has
        tiny_decoder.step(np.array([[7]]), mask, position_ids_from_mask(mask, 1), cache)


@pytest.mark.parametrize("shape", ["mha-linear-rope", "llama3-rope-explicit-head-dim", "projection-biases"])
def test_fusion_follows_other_llama_shapes_and_rope_scalings(tiny, tmp_path, shape):
    """Multi-head (kv = heads) with linear rope scaling, llama3 rope scaling with head_dim set apart from
    hidden/heads, and q/k/v/o projections with biases: the fused export must still pass the fp32 validation against PyTorch (left-padded batch,
    decode steps) and our loop must still match transformers' greedy tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import export_model
    from aira_opt.source.models import load_model

    extra = {
        "mha-linear-rope": {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        "llama3-rope-explicit-head-dim": {
            "num_key_value_heads": 2, "head_dim": 24,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}},
        "projection-biases": {"num_key_value_heads": 2, "attention_bias": True},
    }[shape]
    config = LlamaConfig(vocab_size=tiny.config.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                         bos_token_id=tiny.config.bos_token_id, eos_token_id=tiny.config.eos_token_id,
                         pad_token_id=tiny.config.pad_token_id, **extra)
    torch.manual_seed(0)
    source = tmp_path / "model"
    LlamaForCausalLM(config).eval().save_pretrained(source)
    tiny.tokenizer.save_pretrained(source)
    loaded = load_model(str(source))
    out = tmp_path / "fused"
    export_model(loaded, "fp32", out, quiet=True, fused=True)  # raises ValidationError on any mismatch
    assert op_counts(out)["GroupQueryAttention"] == 2
    ids = prompt_ids(tiny.tokenizer, "What do bees make?")
    with OrtDecoder(out) as decoder:
        ours = generate(decoder, [ids], GREEDY, tiny.tokenizer.eos_token_id, tiny.tokenizer.pad_token_id).tokens[0]
    assert ours == hf_greedy(loaded, ids, GREEDY.max_new_tokens)
