"""Tiny models and tokenizers built on the spot: for tests, the demo and benchmarks (no hub access)."""

from __future__ import annotations

import inspect

import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM, PreTrainedTokenizerFast

from .config import FlexMoREConfig
from .modeling import FlexMoREForCausalLM

SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>"]


def stdlib_text(limit_chars: int = 200_000) -> list[str]:
    """Real English and code that ships with every Python: docstrings and sources of stdlib modules."""
    import argparse
    import collections
    import json
    import textwrap

    texts, total = [], 0
    for module in (textwrap, json, collections, argparse):
        src = inspect.getsource(module)
        texts.append(src)
        total += len(src)
        if total >= limit_chars:
            break
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` (seconds on CPU); id 0 = pad, id 1 = end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1], bos_token=None
    )


def tiny_flexolmo_config(
    vocab_size: int = 512,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    **kwargs,
) -> FlexOlmoConfig:
    return FlexOlmoConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        **kwargs,
    )


@torch.no_grad()
def build_flexolmo(config: FlexOlmoConfig, seed: int = 0, expert_spread: float = 0.5) -> FlexOlmoForCausalLM:
    """A random FlexOlmo whose domain experts are the public expert plus noise, as trained experts are.

    `expert_spread` scales the difference from the public expert relative to the weights' own scale.
    """
    torch.manual_seed(seed)
    model = FlexOlmoForCausalLM(config).eval()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for p in (experts.gate_up_proj, experts.down_proj):  # [E, out, in], fused in memory by HF
            p[1:] = p[0] + expert_spread * (p[1:] - p[0])
    return model


@torch.no_grad()
def build_flexmore(config: FlexMoREConfig, seed: int = 0, delta_scale: float = 0.5) -> FlexMoREForCausalLM:
    """A random FlexMoRE model whose low-rank corrections B A are `delta_scale` times the weights' scale.

    (Default init would make B A ~ rank * std^2, invisible next to the public weights, and tests
    comparing low-rank experts against anything would then pass for the wrong reason.)
    """
    torch.manual_seed(seed)
    model = FlexMoREForCausalLM(config).eval()
    std = config.initializer_range
    for block in model.moe_blocks():
        for expert in block.experts:
            if expert.rank == 0:
                continue
            factor_std = (delta_scale * std / expert.rank**0.5) ** 0.5  # entries of B A: ~ delta_scale * std
            for name, param in expert.named_parameters():
                param.normal_(0.0, factor_std)
    return model
