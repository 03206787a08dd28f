"""Shared fixtures: tiny random FlexOlmo models and a byte-level tokenizer, built once per session."""

from __future__ import annotations

import pytest
import torch

from flexmore.tiny import build_flexolmo, build_tokenizer, stdlib_text, tiny_flexolmo_config

NAMES = ["public", "code", "chat", "math"]


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(stdlib_text(60_000), vocab_size=300)


@pytest.fixture(scope="session")
def flexolmo_config(tokenizer):
    return tiny_flexolmo_config(vocab_size=len(tokenizer), num_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="session")
def flexolmo_model(flexolmo_config):
    return build_flexolmo(flexolmo_config, seed=0)


@pytest.fixture(scope="session")
def flexolmo_dir(tmp_path_factory, flexolmo_model, tokenizer):
    """A FlexOlmo checkpoint as transformers writes it (per-expert keys, one safetensors file)."""
    path = tmp_path_factory.mktemp("ckpt") / "flexolmo"
    flexolmo_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 300, (3, 11), generator=g)
