"""The base-sharing MoE forward equals the dense reconstruction run as ordinary FlexOlmo experts."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import FlexOlmoConfig
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock

from flexmore.config import FlexMoREConfig
from flexmore.experts import PROJECTIONS, FlexMoRESparseMoeBlock


def make_block(hidden, inter, ranks, k, seed=0, delta_scale=0.5):
    cfg = FlexOlmoConfig(hidden_size=hidden, intermediate_size=inter, num_experts=len(ranks), num_experts_per_tok=k,
                         vocab_size=8, pad_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    block = FlexMoRESparseMoeBlock(FlexMoREConfig.from_flexolmo(cfg, expert_ranks=ranks)).eval()
    std = 0.02
    with torch.no_grad():
        block.gate.weight.normal_(0, 1.0 / hidden**0.5)  # spread routing over all experts
        for expert in block.experts:
            for name, p in expert.named_parameters():
                p.normal_(0, std if expert.rank == 0 else (delta_scale * std / expert.rank**0.5) ** 0.5)
    return block, cfg


@torch.no_grad()
def dense_reference(block: FlexMoRESparseMoeBlock, cfg: FlexOlmoConfig) -> FlexOlmoSparseMoeBlock:
    """HF's FlexOlmo block holding each expert's materialised W_public + B A (what the paper ran)."""
    ref = FlexOlmoSparseMoeBlock(cfg).eval()
    ref.gate.weight.copy_(block.gate.weight)
    public = block.experts[0]
    for e, expert in enumerate(block.experts):
        gate, up, down = (expert.dense_weight(p, public) for p in PROJECTIONS)
        ref.experts.gate_up_proj[e] = torch.cat([gate, up], 0)
        ref.experts.down_proj[e] = down
    return ref


RANK_SETS = {
    "tiny-mixed": (16, 24, [0, 1, 5, 16, 0, 3]),  # ranks 1 .. min(H, I), a full domain expert
    "tiny-all-low": (16, 24, [0, 2, 2, 8]),
    "mid-mixed": (256, 704, [0, 8, 64, 0, 256, 1, 128]),
}


@pytest.mark.parametrize("name", list(RANK_SETS))
@pytest.mark.parametrize("k", [1, 2, 4, "E"])
def test_forward_equals_dense_reconstruction(name, k):
    hidden, inter, ranks = RANK_SETS[name]
    k = len(ranks) if k == "E" else k
    block, cfg = make_block(hidden, inter, ranks, k)
    ref = dense_reference(block, cfg)
    x = torch.randn(3, 17, hidden)
    with torch.no_grad():
        assert_close(block(x), ref(x), rtol=2e-5, atol=2e-6)


def test_single_token_decode_step_and_an_expert_without_tokens():
    block, cfg = make_block(16, 24, [0, 4, 4, 0], k=1)
    ref = dense_reference(block, cfg)
    with torch.no_grad():
        for t in range(6):
            x = torch.randn(1, 1, 16)
            assert_close(block(x), ref(x), rtol=2e-5, atol=2e-6)


def test_public_expert_not_routed():
    """Tokens whose top-k excludes the public expert still get the shared base of their low-rank experts."""
    block, cfg = make_block(16, 24, [0, 4, 6, 0], k=2)
    with torch.no_grad():
        block.gate.weight[0, :] = 0.0  # a zero logit for the public expert ...
        block.gate.weight[1:] *= 50  # ... while the others dominate
    ref = dense_reference(block, cfg)
    x = torch.randn(2, 9, 16)
    _, _, index = block.gate(x.reshape(-1, 16))
    assert (index != 0).all(dim=-1).any()  # some tokens skip the public expert
    with torch.no_grad():
        assert_close(block(x), ref(x), rtol=2e-5, atol=2e-6)


def test_training_path_matches_dense_gradients():
    """With gradients on, the differentiable path gives the dense model's output and factor gradients."""
    block, cfg = make_block(16, 24, [0, 3, 0, 5], k=2)
    x = torch.randn(2, 7, 16)
    out = block(x)
    out.square().sum().backward()
    # the same loss through W = W_public + B A built differentiably from the same factors
    public = block.experts[0]
    factors = {}
    dense_weights = []
    for expert in block.experts:
        ws = []
        for p in PROJECTIONS:
            if expert.rank:
                a = getattr(expert, f"{p}_a").weight.detach().clone().requires_grad_()
                b = getattr(expert, f"{p}_b").weight.detach().clone().requires_grad_()
                factors[(id(expert), p)] = (a, b)
                ws.append(getattr(public, p).weight.detach() + b @ a)
            else:
                ws.append(getattr(expert, p).weight.detach())
        dense_weights.append(ws)
    flat = x.reshape(-1, 16)
    _, weights, index = block.gate(flat)
    ref = torch.zeros_like(flat)
    for e, (wg, wu, wd) in enumerate(dense_weights):
        y = torch.nn.functional.linear(torch.nn.functional.silu(flat @ wg.t()) * (flat @ wu.t()), wd)
        ref = ref + y * (weights * (index == e)).sum(-1, keepdim=True).detach()
    assert_close(out.reshape(-1, 16), ref, rtol=2e-5, atol=2e-6)
    ref.square().sum().backward()
    for expert in block.experts:
        if expert.rank:
            for p in PROJECTIONS:
                a, b = factors[(id(expert), p)]
                assert_close(getattr(expert, f"{p}_a").weight.grad, a.grad, rtol=1e-4, atol=1e-6)
                assert_close(getattr(expert, f"{p}_b").weight.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_bf16_within_bf16_tolerance():
    block, cfg = make_block(256, 704, [0, 8, 64, 0, 256, 1, 128], k=4)
    ref = dense_reference(block, cfg)
    x = torch.randn(2, 33, 256)
    with torch.no_grad():
        expected = ref(x)
        got = block.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 0.02 * scale
