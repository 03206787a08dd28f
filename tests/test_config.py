import pytest
import torch

from flexmore import FlexMoREConfig, FlexMoREForCausalLM, FlexmoreError
from flexmore.config import apply_rank_spec, break_even_rank, count_parameters, parse_rank_spec
from flexmore.tiny import tiny_flexolmo_config

NAMES = ["public", "math", "code", "news"]


def make(**kw):
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                num_experts=4, num_experts_per_tok=2, pad_token_id=0)
    base.update(kw)
    return FlexMoREConfig(**base)


def test_defaults_all_full_with_generic_names():
    c = make()
    assert c.expert_ranks == [0, 0, 0, 0]
    assert c.expert_names == ["public", "expert1", "expert2", "expert3"]
    assert c.max_rank == 32


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(expert_ranks=[0, -1, 0, 0]), "negative rank"),
        (dict(expert_ranks=[4, 0, 0, 0]), "public expert"),
        (dict(expert_ranks=[0, 0, 0]), "3 entries but num_experts is 4"),
        (dict(expert_ranks=[0, 33, 0, 0]), "above min(hidden_size, intermediate_size) = 32"),
        (dict(expert_names=["public", "a", "a", "b"]), "unique"),
        (dict(expert_names=["public", "a"]), "expert_names has 2 entries"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok=5"),
    ],
)
def test_invalid_configs_are_clear_errors(kw, fragment):
    with pytest.raises(FlexmoreError, match=None) as err:
        make(**kw)
    assert fragment in str(err.value)


def test_config_round_trips_through_json(tmp_path):
    c = make(expert_ranks=[0, 8, 0, 2], expert_names=NAMES)
    c.save_pretrained(tmp_path)
    back = FlexMoREConfig.from_pretrained(tmp_path)
    assert back.expert_ranks == [0, 8, 0, 2] and back.expert_names == NAMES and back.model_type == "flexmore"


def test_rank_spec_forms():
    assert parse_rank_spec("64", NAMES) == {1: 64, 2: 64, 3: 64}
    assert parse_rank_spec("math=2048,code=256,news=full", NAMES) == {1: 2048, 2: 256, 3: 0}
    assert parse_rank_spec("2=8, 3 = FULL", NAMES) == {2: 8, 3: 0}


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("math=abc", "'abc' is not a non-negative integer"),
        ("math=-3", "'-3' is not a non-negative integer"),
        ("nosuch=4", "unknown expert 'nosuch'"),
        ("public=4", "public expert"),
        ("math=4,math=8", "given twice"),
        ("math", "'math' is not a non-negative integer"),
        ("math=4,code", "not of the form expert=rank"),
    ],
)
def test_bad_rank_specs(spec, fragment):
    with pytest.raises(FlexmoreError) as err:
        parse_rank_spec(spec, NAMES)
    assert fragment in str(err.value)


def test_apply_rank_spec_checks_dimensions():
    c = make(expert_names=NAMES)
    assert apply_rank_spec(c, "math=4,news=full") == [0, 4, 0, 0]
    with pytest.raises(FlexmoreError, match="exceeds min"):
        apply_rank_spec(c, "math=33")


@pytest.mark.parametrize("ranks", [[0, 0, 0, 0], [0, 1, 7, 0], [0, 32, 16, 3]])
@pytest.mark.parametrize("tie, bias, kv", [(False, False, 4), (True, True, 2)])
def test_config_count_equals_built_model(ranks, tie, bias, kv):
    c = make(expert_ranks=ranks, tie_word_embeddings=tie, attention_bias=bias, num_key_value_heads=kv)
    model = FlexMoREForCausalLM(c)
    built = sum(p.numel() for p in model.parameters())  # parameters() counts a tied weight once
    assert c.parameter_count().total == built
    assert c.parameter_count().nbytes("bfloat16") == 2 * built


def test_flexolmo_7x7b_counts_exactly_on_meta_device():
    from transformers import FlexOlmoConfig

    cfg = FlexMoREConfig.from_flexolmo(FlexOlmoConfig())  # the released 7x7B architecture
    with torch.device("meta"):
        model = FlexMoREForCausalLM(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == cfg.parameter_count().total == 33_270_665_216
    assert count_parameters(FlexOlmoConfig(num_experts=1), [0]).total - 4096 * 32 == 7_298_617_344  # dense public
    assert count_parameters(FlexOlmoConfig(num_experts=2)).total == 11_627_401_216


def test_six_low_rank_experts_summing_to_2380_give_10_75b():
    from transformers import FlexOlmoConfig

    ranks = [0, 512, 256, 1024, 64, 500, 24]
    assert sum(ranks) == 2380
    cfg = FlexMoREConfig.from_flexolmo(FlexOlmoConfig(), expert_ranks=ranks)
    with torch.device("meta"):
        model = FlexMoREForCausalLM(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == cfg.parameter_count().total == 7_299_534_848 + 1_449_984 * 2380
    assert round(built / 1e9, 2) == 10.75


def test_break_even_rank():
    h, i = 4096, 11008
    r = break_even_rank(h, i)
    assert r * (h + i) >= h * i > (r - 1) * (h + i)
    assert r == 2986


def test_tiny_config_helper_is_valid():
    c = FlexMoREConfig.from_flexolmo(tiny_flexolmo_config(), expert_ranks=[0, 2, 0, 4])
    assert c.architectures == ["FlexMoREForCausalLM"] and c.num_experts == 4
