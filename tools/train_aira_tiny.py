"""Train the bundled `aira-tiny` model from scratch, reproducibly, on the synthetic Aira-format set.

    python tools/train_aira_tiny.py [--output aira_opt/assets/aira-tiny]

It builds a byte-level BPE tokenizer with Aira's five special tokens, a small LlamaForCausalLM with Aira's
structure (grouped-query attention, untied embeddings), and trains it until every greedy answer to a
training question is exactly right. Peaked, meaningful distributions are the point: parity and
quantization checks on a random model prove little.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aira_opt.source.corpus import calibration_questions, heldout_pairs, training_pairs  # noqa: E402
from aira_opt.source.prompts import conversation_ids, decode_answer, prompt_ids  # noqa: E402
from aira_opt.source.models import AIRA_TOKENS, CARD_GENERATION_DEFAULTS  # noqa: E402

SEED = 0
VOCAB_SIZE = 512  # bytes (256) + merges + 5 specials: enough for whole words of the corpus
# Small, yet Aira's structure: 4 heads over 2 KV heads (GQA), head_dim 32, untied embeddings.
SHAPE = dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=352, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
MAX_STEPS = 600
LR = 3e-3


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [AIRA_TOKENS.unk, AIRA_TOKENS.bos, AIRA_TOKENS.eos, AIRA_TOKENS.sep, AIRA_TOKENS.pad]
    tok = Tokenizer(models.BPE(unk_token=AIRA_TOKENS.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [f"{q} {a}" for q, a in training_pairs()] + calibration_questions()
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=AIRA_TOKENS.bos, eos_token=AIRA_TOKENS.eos, unk_token=AIRA_TOKENS.unk,
        pad_token=AIRA_TOKENS.pad, sep_token=AIRA_TOKENS.sep, padding_side="left",
        model_max_length=SHAPE["max_position_embeddings"], clean_up_tokenization_spaces=False,
    )


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    ids = torch.tensor([prompt_ids(tokenizer, question)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return decode_answer(tokenizer, out[0, ids.shape[1]:].tolist())


def train(output: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(**SHAPE, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="float32")
    model = LlamaForCausalLM(config)
    pairs = training_pairs()
    seqs = [conversation_ids(tokenizer, q, a) for q, a in pairs]
    width = max(map(len, seqs))
    # input_ids/labels: [N, width], right-padded; padding is ignored by the loss (-100)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.tensor(s)
    mask = (labels != -100).long()

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=MAX_STEPS, pct_start=0.1)
    model.train()
    for step in range(1, MAX_STEPS + 1):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    model.eval()

    wrong = [(q, a, got) for q, a in pairs if (got := greedy_answer(model, tokenizer, q)) != a]
    for q, a, got in wrong:
        print(f"WRONG: {q!r}: expected {a!r}, got {got!r}")
    if wrong:
        raise SystemExit(f"{len(wrong)} of {len(pairs)} greedy answers are wrong; not saving")
    print(f"all {len(pairs)} greedy answers right")

    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    gen = GenerationConfig(**CARD_GENERATION_DEFAULTS, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    gen.save_pretrained(output)
    heldout = [conversation_ids(tokenizer, q, a) for q, a in heldout_pairs()]
    (output / "TRAINING.json").write_text(json.dumps({
        "script": "tools/train_aira_tiny.py", "seed": SEED, "steps": MAX_STEPS, "lr": LR, "shape": SHAPE,
        "vocab_size": len(tokenizer), "train_pairs": len(pairs), "final_loss": round(loss.item(), 5),
        "heldout_tokens": sum(map(len, heldout)),
    }, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "aira_opt" / "assets" / "aira-tiny")
    train(parser.parse_args().output)
