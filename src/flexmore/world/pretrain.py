"""Pretraining the tiny world's public model from scratch (OLMo-2 architecture as a 1-expert FlexOlmo)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import atomic_dir, write_meta
from ..tiny import build_flexolmo, tiny_flexolmo_config


@dataclass
class PretrainConfig:
    hidden_size: int = 64  # model width
    intermediate_size: int = 176  # FFN width (about 2.75 x hidden, as in OLMo-2)
    layers: int = 2
    heads: int = 4
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3  # peak learning rate (cosine decay after a short warm-up)
    seed: int = 0


def pretrain_public(texts: list[str], tokenizer, out: Path, config: PretrainConfig,
                    on_step: Callable[[int, float, float], None] | None = None) -> Path:
    """Train a 1-expert FlexOlmo language model on `texts`; writes a checkpoint with its tokenizer at `out`."""
    from ..training.data import pack

    torch.manual_seed(config.seed)
    data = pack(texts, tokenizer, config.seq_len + 1)  # [n, seq_len + 1]: inputs and shifted targets
    model_config = tiny_flexolmo_config(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_experts=1, num_experts_per_tok=1,
    )
    model_config.max_position_embeddings = max(256, config.seq_len + 1)
    model = build_flexolmo(model_config, seed=config.seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, config.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.steps))))
    generator = torch.Generator().manual_seed(config.seed)
    start = time.perf_counter()
    for step in range(config.steps):
        batch = data[torch.randint(0, len(data), (config.batch_size,), generator=generator)]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            tokens = (step + 1) * config.batch_size * config.seq_len
            on_step(step + 1, loss.detach().item(), tokens / (time.perf_counter() - start))
    model.eval()
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_meta(tmp, {"operation": "pretrain public model", "config": config.__dict__})
    return out
