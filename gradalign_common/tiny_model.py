"""The built-in tiny model: a small Qwen2-architecture causal LM with a character tokenizer,
warm-started by a short supervised pass on the arithmetic task so that it begins with
partial accuracy, and saved as a normal Hugging Face model directory.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from gradalign_common.char_tokenizer import build_char_tokenizer
from gradalign_common.modeling import save_checkpoint
from gradalign_common.tiny_task import MAX_OPERAND, arith_problem


@dataclass(frozen=True)
class TinyModelSpec:
    """A tiny Qwen2 (architecture) and its supervised warm start on the arithmetic task (training)."""

    hidden_size: int = 64  # residual width
    num_layers: int = 2  # decoder layers
    # head size 32 (64 / 2): vLLM's CPU attention needs 32, 64, 80, 96, 112 or 128 (the rollout
    # service's vllm backend runs the tiny model on CPU); same parameters and FLOPs as 4 heads
    # of 16 with 2 KV heads
    num_heads: int = 2
    num_kv_heads: int = 1  # grouped-query attention
    intermediate_size: int = 192  # MLP width
    max_positions: int = 64  # prompt + response tokens at most
    # whether a warm start "clicks" (~45% greedy accuracy on the pairs it trains on) or stays near
    # 7% is a lottery over seeds at 300 steps; 450 steps make the default seed click with 2 heads
    warmup_steps: int = 450
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0


def build_tiny_model(spec: TinyModelSpec, tokenizer):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    return Qwen2ForCausalLM(qwen2_config(spec, len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=pad))


def qwen2_config(spec: TinyModelSpec, vocab_size: int, **extra):
    """The Qwen2 config (tied embeddings) of `spec`'s architecture; `extra` sets token ids and other fields."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True, **extra,
    )


def supervised_step(model, tokenizer, batch: list[tuple[str, str]], opt, sched) -> float:
    """One supervised step on (prompt, answer) pairs: loss on answer + EOS tokens only; returns the loss."""
    eos = tokenizer.eos_token_id
    seqs, labels = [], []
    for prompt, answer in batch:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    lab = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def warm_start(model, tokenizer, spec: TinyModelSpec, exclude: set[str] = frozenset()) -> float:
    """Supervised pass on "a+b=" -> "c<eos>" (loss on the answer only); returns the last loss."""
    rng = random.Random(spec.seed)
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    pairs = [p for p in pairs if arith_problem(*p)[0] not in exclude]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    model.train()
    loss_value = float("nan")
    for _ in range(spec.warmup_steps):
        batch = [arith_problem(*rng.choice(pairs)) for _ in range(spec.batch_size)]
        loss_value = supervised_step(model, tokenizer, batch, opt, sched)
    model.eval()
    return loss_value


def build_and_save(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec(), exclude: set[str] = frozenset()) -> Path:
    """Build, warm-start and save the tiny model + tokenizer as a HF directory at out_dir."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(spec, tokenizer)
    if spec.warmup_steps:
        warm_start(model, tokenizer, spec, exclude)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_checkpoint(model, tokenizer, out_dir)


def save_perturbed_copy(checkpoint: Path, out: Path, scale: float = 0.3, seed: int = 0) -> Path:
    """Another checkpoint of the same architecture and tokenizer at `out`: every weight (the embeddings too)
    plus seeded noise of `scale` times that tensor's std. For checks that a service really swapped weights."""
    from gradalign_common.modeling import load_model

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(checkpoint, out)
    model = load_model(checkpoint)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    model.save_pretrained(out)
    return out
