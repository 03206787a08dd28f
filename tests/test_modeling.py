"""Parity with the HF FlexOlmo reference, the save/load round trip, opt-out, top-k and generation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, FlexOlmoConfig, FlexOlmoForCausalLM

import flexmore  # noqa: F401 - registers the Auto classes
from flexmore import FlexMoREConfig, FlexMoREForCausalLM, FlexmoreError
from flexmore.convert import convert_checkpoint, load_model
from flexmore.experts import LowRankExpert
from flexmore.tiny import build_flexmore

from .conftest import NAMES

TIGHT = dict(rtol=1e-5, atol=1e-5)


def hf_with_top_k(model: FlexOlmoForCausalLM, k: int) -> FlexOlmoForCausalLM:
    model = copy.deepcopy(model)
    model.config.num_experts_per_tok = k
    for layer in model.model.layers:
        layer.mlp.gate.top_k = k
    return model


def padded_batch(input_ids):
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0  # left padding on the first row
    mask[1, -3:] = 0  # right padding on the second
    return dict(input_ids=input_ids, attention_mask=mask)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_all_full_flexmore_matches_hf_flexolmo(flexolmo_model, flexolmo_dir, input_ids, k):
    ref = hf_with_top_k(flexolmo_model, k)
    ours = load_model(flexolmo_dir, top_k=k)
    assert isinstance(ours, FlexMoREForCausalLM) and ours.config.expert_ranks == [0, 0, 0, 0]
    batch = padded_batch(input_ids)
    with torch.no_grad():
        expected, got = ref(**batch).logits, ours(**batch).logits
    assert_close(got, expected, **TIGHT)


@pytest.fixture(scope="module")
def mixed_model(flexolmo_config):
    cfg = FlexMoREConfig.from_flexolmo(flexolmo_config, expert_ranks=[0, 3, 0, 8], expert_names=NAMES)
    return build_flexmore(cfg, seed=3)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, mixed_model, tokenizer):
    path = tmp_path_factory.mktemp("mixed") / "flexmore"
    mixed_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("k", [1, 2, 4])
def test_low_rank_flexmore_matches_its_dense_export_in_hf(mixed_model, mixed_dir, tmp_path, input_ids, k):
    dense_dir = convert_checkpoint(mixed_dir, tmp_path / "dense", to="flexolmo", top_k=k).out
    dense = FlexOlmoForCausalLM.from_pretrained(dense_dir).eval()
    assert type(dense) is FlexOlmoForCausalLM and dense.config.num_experts_per_tok == k
    ours = copy.deepcopy(mixed_model)
    ours.set_top_k(k)
    batch = padded_batch(input_ids)
    with torch.no_grad():
        assert_close(ours(**batch).logits, dense(**batch).logits, **TIGHT)


def test_low_rank_corrections_matter(mixed_model, input_ids):
    """Guards the parity tests: with the corrections zeroed the logits must move visibly."""
    zeroed = copy.deepcopy(mixed_model)
    zeroed.set_top_k(4)
    base = copy.deepcopy(zeroed)
    with torch.no_grad():
        for block in zeroed.moe_blocks():
            for expert in block.experts:
                if isinstance(expert, LowRankExpert):
                    for p in expert.parameters():
                        p.zero_()
        diff = (base(input_ids).logits - zeroed(input_ids).logits).abs().max()
    assert diff > 1e-3


def test_save_load_round_trip_is_bit_identical(mixed_model, mixed_dir, input_ids):
    assert AutoConfig.from_pretrained(mixed_dir).model_type == "flexmore"
    loaded = AutoModelForCausalLM.from_pretrained(mixed_dir).eval()
    assert type(loaded) is FlexMoREForCausalLM
    assert loaded.config.expert_ranks == [0, 3, 0, 8] and loaded.config.expert_names == NAMES
    a, b = mixed_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        assert torch.equal(mixed_model(input_ids).logits, loaded(input_ids).logits)


def test_state_dict_keys_follow_the_format(mixed_model, flexolmo_config):
    sd = mixed_model.state_dict()
    h, i = flexolmo_config.hidden_size, flexolmo_config.intermediate_size
    assert sd["model.layers.0.mlp.experts.0.gate_proj.weight"].shape == (i, h)
    assert sd["model.layers.1.mlp.experts.2.down_proj.weight"].shape == (h, i)
    assert sd["model.layers.0.mlp.experts.1.gate_proj_a.weight"].shape == (3, h)
    assert sd["model.layers.0.mlp.experts.1.gate_proj_b.weight"].shape == (i, 3)
    assert sd["model.layers.0.mlp.experts.3.down_proj_a.weight"].shape == (8, i)
    assert sd["model.layers.0.mlp.experts.3.down_proj_b.weight"].shape == (h, 8)
    assert "model.layers.0.mlp.experts.1.gate_proj.weight" not in sd  # no dense weight for low-rank experts
    assert sd["model.layers.0.mlp.gate.weight"].shape == (4, h)


class _MatmulOperands(TorchDispatchMode):
    """Records the storage of both operands of every matrix multiplication."""

    def __init__(self):
        super().__init__()
        self.operands = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0].rstrip("_") in ("mm", "addmm", "bmm", "matmul", "linear"):
            self.operands.append({a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


def test_forward_never_materialises_a_dense_delta(mixed_model, input_ids):
    """No matmul in the forward pass takes two factor weights (B @ A would build the dense delta)."""
    model = copy.deepcopy(mixed_model)
    model.set_top_k(4)
    factors = {
        p.untyped_storage().data_ptr()
        for block in model.moe_blocks()
        for expert in block.experts
        if isinstance(expert, LowRankExpert)
        for p in expert.parameters()
    }
    with _MatmulOperands() as spy, torch.no_grad():
        model(input_ids)
    uses = [ops & factors for ops in spy.operands]
    assert sum(1 for u in uses if u) >= 2 * 6 * 2, "the spy did not see the factors used"
    assert all(len(u) <= 1 for u in uses)


def test_opt_out_equals_flexolmo_built_without_the_expert(flexolmo_model, flexolmo_dir, tmp_path, input_ids):
    drop = 2  # "chat"
    keep = [0, 1, 3]
    cfg = FlexOlmoConfig(**{**flexolmo_model.config.to_dict(), "num_experts": 3})
    without = FlexOlmoForCausalLM(cfg).eval()
    sd = {}
    for key, value in flexolmo_model.state_dict().items():
        if key.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")):
            value = value[keep]
        sd[key] = value
    without.load_state_dict(sd)
    ours = load_model(flexolmo_dir, drop_experts=[NAMES[drop]], expert_names=NAMES)
    assert ours.config.expert_names == ["public", "code", "math"] and ours.config.num_experts == 3
    with torch.no_grad():
        expected = without(input_ids).logits
        assert_close(ours(input_ids).logits, expected, **TIGHT)
        # the same through a converted checkpoint
        out = convert_checkpoint(flexolmo_dir, tmp_path / "optout", drop_experts=["chat"], expert_names=NAMES).out
        assert_close(load_model(out)(input_ids).logits, expected, **TIGHT)
        # zeroing the expert instead is NOT the same (no renormalisation)
        zeroed = load_model(flexolmo_dir, expert_names=NAMES)
        for block in zeroed.moe_blocks():
            for p in block.experts[drop].parameters():
                p.zero_()
        assert (zeroed(input_ids).logits - expected).abs().max() > 1e-4


def test_opt_out_refuses_public_and_unknown(flexolmo_dir):
    with pytest.raises(FlexmoreError, match="public expert cannot be opted out"):
        load_model(flexolmo_dir, drop_experts=["public"])
    with pytest.raises(FlexmoreError, match="unknown expert 'nosuch'"):
        load_model(flexolmo_dir, drop_experts=["nosuch"])


def test_opt_out_clamps_active_k(flexolmo_dir):
    model = load_model(flexolmo_dir, top_k=4)
    model.drop_experts(["expert1", "expert2"])
    assert model.config.num_experts == 2 and model.config.num_experts_per_tok == 2
    assert all(block.gate.top_k == 2 and block.gate.weight.shape[0] == 2 for block in model.moe_blocks())


def test_set_top_k_validates(mixed_model):
    model = copy.deepcopy(mixed_model)
    for bad in (0, 5):
        with pytest.raises(FlexmoreError, match="--top-k"):
            model.set_top_k(bad)


def test_generate_with_cache_matches_full_recompute(mixed_model, tokenizer):
    ids = tokenizer("def main(args):", return_tensors="pt").input_ids
    out = mixed_model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    # greedy decoding with the KV cache picks the argmax of a full recompute at every step
    with torch.no_grad():
        logits = mixed_model(out[:, :-1]).logits
    assert torch.equal(logits[0, ids.shape[1] - 1 :].argmax(-1), out[0, ids.shape[1] :])


def test_bf16_forward_close_to_fp32(mixed_model, input_ids):
    bf16 = copy.deepcopy(mixed_model).to(torch.bfloat16)
    with torch.no_grad():
        ref = mixed_model(input_ids).logits
        got = bf16(input_ids).logits.float()
    assert_close(got, ref, rtol=0.05, atol=0.05)
