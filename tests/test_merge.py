"""Merging owners' 2-expert checkpoints into one mixture (`flexmore.merge`, `flexmore merge`).

The world: one public model (a 1-expert FlexOlmo) and owners derived from it the way the FlexOlmo
recipe makes them: shared weights, expert 0 and router row 0 copied from the public model, expert 1 and
router row 1 their own. Three owners are full-size FlexOlmo checkpoints, one is a FlexMoRE checkpoint
whose expert 1 is low-rank. The oracle for every merge is a stock `FlexOlmoForCausalLM` assembled by
hand in memory from the public model and the owners' experts (a low-rank one materialised W0 + B A).

Properties checked:
  layout      router rows [public; owner_1; ...], each slot's tensors and every shared tensor equal
              their source bit for bit; low-rank factors stay factors; names and k in the config;
  outputs     the merged model (stock FlexOlmo, `load_model`, `AutoModelForCausalLM`) computes the
              reference's logits;
  refusals    a differing shared tensor / expert 0 / router row 0, another public model, another
              architecture, NaN or Inf, bad names, bad expert counts, an existing OUT: each one error
              naming what is at fault, and nothing written (no OUT, no temporary sibling).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, FlexOlmoForCausalLM

from flexmore import cli
from flexmore.checkpoint import CheckpointReader
from flexmore.config import FlexMoREConfig
from flexmore.convert import expected_shapes, load_model, read_config
from flexmore.errors import FlexmoreError
from flexmore.merge import merge_experts
from flexmore.modeling import FlexMoREForCausalLM, dense_expert_weights
from flexmore.tiny import build_flexmore, build_flexolmo, tiny_flexolmo_config
from tests.test_cli import Result, assert_one_error_line, leftovers, rewrite_tensors, snapshot

H, I, L = 32, 64, 2
RANK = 4
FULL_OWNERS = ("code", "news", "math")  # directory names, and the default expert names (config says "expert1")
LOW_RANK_NAME = "legal"  # named in its FlexMoRE config; its directory is called "lowrank-owner"
PROJ = ("gate_proj", "up_proj", "down_proj")
ROUTER = "model.layers.{layer}.mlp.gate.weight"
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight")  # HF in-memory keys per layer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Owner:
    path: Path
    expert: dict[str, torch.Tensor]  # HF in-memory key -> this owner's slot: [1, 2I, H], [1, H, I], router [1, H]


@dataclass(frozen=True)
class World:
    root: Path
    public: FlexOlmoForCausalLM
    public_dir: Path
    owners: dict[str, Owner]  # FULL_OWNERS and LOW_RANK_NAME

    def dirs(self, *names: str) -> list[Path]:
        return [self.owners[n].path for n in names]


def derive_owner(public: FlexOlmoForCausalLM, seed: int) -> FlexOlmoForCausalLM:
    """A 2-expert FlexOlmo [public, domain] as an owner's training leaves it: only expert 1 and row 1 new."""
    g = torch.Generator().manual_seed(seed)
    config = tiny_flexolmo_config(
        vocab_size=public.config.vocab_size, hidden_size=public.config.hidden_size,
        intermediate_size=public.config.intermediate_size, num_hidden_layers=L, num_experts=2, num_experts_per_tok=2,
    )
    owner = FlexOlmoForCausalLM(config).eval()
    state = {}
    for key, value in public.state_dict().items():
        if key.endswith(FUSED[:2]):  # [1, out, in] -> [2, out, in]: the domain expert is the public one trained
            state[key] = torch.cat([value, value + 0.02 * torch.randn(value.shape, generator=g)])
        elif key.endswith(FUSED[2]):  # router [1, H] -> [2, H]
            state[key] = torch.cat([value, torch.randn(value.shape, generator=g)])
        else:
            state[key] = value.clone()
    owner.load_state_dict(state, strict=True)
    return owner


def save(model, path: Path, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def domain_slot(model: FlexOlmoForCausalLM) -> dict[str, torch.Tensor]:
    return {k: v[1:2].clone() for k, v in model.state_dict().items() if k.endswith(FUSED)}


def low_rank_owner(public_dir: Path, seed: int) -> tuple[FlexMoREForCausalLM, dict[str, torch.Tensor]]:
    """A 2-expert FlexMoRE owner whose expert 1 is rank RANK; everything public copied from the public model."""
    config = FlexMoREConfig.from_flexolmo(
        tiny_flexolmo_config(vocab_size=load_file(public_dir / "model.safetensors")["lm_head.weight"].shape[0],
                             num_experts=2, num_experts_per_tok=2),
        expert_ranks=[0, RANK], expert_names=["public", LOW_RANK_NAME],
    )
    model = build_flexmore(config, seed=seed, delta_scale=2.0)
    public = load_file(public_dir / "model.safetensors")  # on-disk keys = FlexMoRE's keys for shared + expert 0
    state = model.state_dict()
    own = {k for k in state if k not in public}
    factors = {expert_file_key(layer, 1, proj, part) for layer in range(L) for proj in PROJ for part in ("_a", "_b")}
    assert own == factors
    g = torch.Generator().manual_seed(seed)
    for key, value in public.items():
        state[key] = torch.cat([value, torch.randn(value.shape, generator=g)]) if key.endswith(FUSED[2]) else value
    model.load_state_dict(state, strict=True)
    # its expert 1 as a dense FlexOlmo slot (W0 + B A), for the reference model
    dense = dense_expert_weights(model)
    slot = {}
    for layer in range(L):
        e1 = f"model.layers.{layer}.mlp.experts.1.{{}}.weight"
        slot[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat(
            [dense[e1.format("gate_proj")], dense[e1.format("up_proj")]]  # gate rows first (REFERENCE §2)
        )[None]
        slot[f"model.layers.{layer}.mlp.experts.down_proj"] = dense[e1.format("down_proj")][None]
        slot[ROUTER.format(layer=layer)] = state[ROUTER.format(layer=layer)][1:2].clone()
    return model, slot


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> World:
    root = tmp_path_factory.mktemp("merge-world")
    public_config = tiny_flexolmo_config(vocab_size=len(tokenizer), num_experts=1, num_experts_per_tok=1)
    public = build_flexolmo(public_config, seed=0)
    public_dir = save(public, root / "public", tokenizer)
    owners = {}
    for i, name in enumerate(FULL_OWNERS):
        model = derive_owner(public, seed=10 + i)
        owners[name] = Owner(save(model, root / name, tokenizer), domain_slot(model))
    model, slot = low_rank_owner(public_dir, seed=20)
    owners[LOW_RANK_NAME] = Owner(save(model, root / "lowrank-owner", tokenizer), slot)
    return World(root, public, public_dir, owners)


@pytest.fixture(scope="module")
def full_merge(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "full"
    merge_experts(out, world.dirs(*FULL_OWNERS))
    return out


def reference(world: World, owners: list[str], top_k: int) -> FlexOlmoForCausalLM:
    """The merged model assembled by hand: public weights, then the owners' slots in order."""
    config = tiny_flexolmo_config(vocab_size=world.public.config.vocab_size, num_experts=len(owners) + 1,
                                  num_experts_per_tok=top_k)
    model = FlexOlmoForCausalLM(config).eval()
    state = {
        key: torch.cat([value] + [world.owners[o].expert[key] for o in owners]) if key.endswith(FUSED) else value
        for key, value in world.public.state_dict().items()
    }
    model.load_state_dict(state, strict=True)
    return model


def ids() -> torch.Tensor:
    return torch.randint(2, 300, (3, 13), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(ids()).logits


def expert_file_key(layer: int, expert: int, proj: str, part: str = "") -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}{part}.weight"


def assert_layout(out: Path, world: World, owners: list[str]) -> None:
    """Every tensor of the merge equals its source bit for bit, and there is nothing else."""
    merged = load_file(out / "model.safetensors")
    public = load_file(world.public_dir / "model.safetensors")
    sources = [load_file(world.owners[o].path / "model.safetensors") for o in owners]
    assert set(merged) == set(expected_shapes(read_config(CheckpointReader(out))))
    for key, value in public.items():
        if ".mlp.gate." in key:
            continue
        assert merged[key].dtype == value.dtype and torch.equal(merged[key], value), key  # shared and expert 0
    for layer in range(L):
        router = ROUTER.format(layer=layer)
        expected = torch.cat([public[router]] + [src[router][1:2] for src in sources])
        assert torch.equal(merged[router], expected)
        for slot, src in enumerate(sources, start=1):
            own = {k.replace(".experts.1.", f".experts.{slot}."): v for k, v in src.items()
                   if k.startswith(f"model.layers.{layer}.mlp.experts.1.")}
            assert own and all(torch.equal(merged[k], v) for k, v in own.items()), (slot, layer)


def merge_error(out: Path, inputs: list[Path], *mentions: str, **kwargs) -> str:
    """A refused merge: FlexmoreError mentioning each string, and nothing at OUT or beside it."""
    with pytest.raises(FlexmoreError) as info:
        merge_experts(out, inputs, **kwargs)
    message = str(info.value)
    for text in mentions:
        assert text in message, f"{text!r} not in {message!r}"
    assert not out.exists()
    assert leftovers(out) == []
    return message


# --------------------------------------------------------------------------------------------------
# Layout and outputs


def test_full_owners_merge_into_a_stock_flexolmo(world: World, full_merge: Path) -> None:
    config = json.loads((full_merge / "config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["architectures"] == ["FlexOlmoForCausalLM"]
    assert config["num_experts"] == 4 and config["num_experts_per_tok"] == 2  # the owners' k, clamped to 4
    assert "expert_names" not in config
    assert read_config(CheckpointReader(full_merge)).expert_names == ["public", *FULL_OWNERS]  # via flexmore.json
    assert_layout(full_merge, world, list(FULL_OWNERS))

    expected = logits(reference(world, list(FULL_OWNERS), top_k=2))
    stock, loading = FlexOlmoForCausalLM.from_pretrained(full_merge, output_loading_info=True)
    assert not any(loading.values()), loading
    assert torch.equal(logits(stock), expected)  # same code, same weights: the same numbers
    torch.testing.assert_close(logits(load_model(full_merge)), expected, rtol=1e-5, atol=1e-5)

    meta = json.loads((full_merge / "flexmore.json").read_text())
    assert meta["operation"] == "merge" and meta["public"] is None
    assert meta["owners"] == [str(p) for p in world.dirs(*FULL_OWNERS)]
    for name in TOKENIZER_FILES:  # carried from the first input
        assert (full_merge / name).read_bytes() == (world.owners[FULL_OWNERS[0]].path / name).read_bytes()


def test_public_model_first_gives_the_same_merge(world: World, full_merge: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = merge_experts(out, [world.public_dir, *world.dirs(*FULL_OWNERS)])
    assert result.public == str(world.public_dir) and result.owners == [str(p) for p in world.dirs(*FULL_OWNERS)]
    assert result.expert_names == ["public", *FULL_OWNERS]
    merged, without_public = load_file(out / "model.safetensors"), load_file(full_merge / "model.safetensors")
    assert merged.keys() == without_public.keys()
    assert all(torch.equal(merged[k], without_public[k]) for k in merged)
    assert json.loads((out / "config.json").read_text()) == json.loads((full_merge / "config.json").read_text())
    assert json.loads((out / "flexmore.json").read_text())["public"] == str(world.public_dir)


def test_low_rank_owner_gives_a_flexmore_checkpoint(world: World, tmp_path: Path) -> None:
    owners = ["code", LOW_RANK_NAME, "news"]
    out = tmp_path / "out"
    result = merge_experts(out, [world.public_dir, *world.dirs(*owners)])
    assert result.target == "flexmore"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "flexmore"
    assert config["expert_ranks"] == [0, 0, RANK, 0]
    assert config["expert_names"] == ["public", *owners]  # "legal" from the owner's config, others by directory
    merged = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.layers.0.mlp.experts.2.gate_proj.") for k in merged)  # factors stay factors
    assert merged[expert_file_key(0, 2, "gate_proj", "_a")].shape == (RANK, H)
    assert_layout(out, world, owners)

    import flexmore  # noqa: F401  registers the flexmore model type with the Auto classes

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, FlexMoREForCausalLM) and model.config.expert_ranks == [0, 0, RANK, 0]
    expected = logits(reference(world, owners, top_k=2))
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_model(out)), expected, rtol=1e-5, atol=1e-5)


def test_names_and_top_k_options(world: World, tmp_path: Path) -> None:
    result = merge_experts(tmp_path / "out", world.dirs("math", "code"), names=["m", "c"], top_k=3)
    assert result.expert_names == ["public", "m", "c"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 3
    expected = logits(reference(world, ["math", "code"], top_k=3))
    torch.testing.assert_close(logits(load_model(tmp_path / "out")), expected, rtol=1e-5, atol=1e-5)


def test_single_owner_gives_its_own_model_back(world: World, tmp_path: Path) -> None:
    """One owner is the smallest merge: the same 2-expert model back, tensors equal to the owner's."""
    result = merge_experts(tmp_path / "out", world.dirs("news"))
    assert result.expert_names == ["public", "news"] and result.config.num_experts_per_tok == 2
    merged = load_file(tmp_path / "out" / "model.safetensors")
    owner = load_file(world.owners["news"].path / "model.safetensors")
    assert merged.keys() == owner.keys() and all(torch.equal(merged[k], owner[k]) for k in merged)


# --------------------------------------------------------------------------------------------------
# Refusals: nothing is written


def copy_owner(world: World, name: str, dest: Path) -> Path:
    shutil.copytree(world.owners[name].path, dest)
    return dest


def bump(key: str, row: int | None = None):
    """An edit that changes one element of `key` (in row `row` for a router)."""
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        t = tensors[key].clone()
        t[(row or 0), 0] += 1e-3
        tensors[key] = t
    return edit


@pytest.mark.parametrize(
    ("key", "row"),
    [
        ("model.layers.1.self_attn.q_proj.weight", None),  # layer 1: writing had begun when it is found
        (expert_file_key(0, 0, "down_proj"), None),  # the public expert
        (ROUTER.format(layer=1), 0),  # the public router row
    ],
)
def test_differing_public_tensor_is_refused(world: World, tmp_path: Path, key: str, row: int | None) -> None:
    bad = copy_owner(world, "news", tmp_path / "news")
    rewrite_tensors(bad, bump(key, row))
    first = world.owners["code"].path / "model.safetensors"
    merge_error(tmp_path / "out", [world.owners["code"].path, bad, world.owners["math"].path],
                f"{key}", f"differs between {first} and {bad / 'model.safetensors'}", "same public model")


def test_owners_own_row_and_expert_may_differ(world: World, tmp_path: Path) -> None:
    """The owner's router row 1 and expert 1 are theirs: changing them is no mismatch, and they travel."""
    changed = copy_owner(world, "news", tmp_path / "news")
    rewrite_tensors(changed, bump(ROUTER.format(layer=1), row=1))
    out = tmp_path / "out"
    merge_experts(out, [world.owners["code"].path, changed])
    merged, src = load_file(out / "model.safetensors"), load_file(changed / "model.safetensors")
    assert torch.equal(merged[ROUTER.format(layer=1)][2], src[ROUTER.format(layer=1)][1])


def test_public_model_that_differs_is_named(world: World, tmp_path: Path) -> None:
    public = tmp_path / "public"
    shutil.copytree(world.public_dir, public)
    key = "model.layers.0.post_attention_layernorm.weight"
    rewrite_tensors(public, lambda t: t.update({key: t[key] * 2}))
    merge_error(tmp_path / "out", [public, *world.dirs("code", "news")],
                key, str(public / "model.safetensors"), str(world.owners["code"].path / "model.safetensors"))


def test_owner_stored_in_another_dtype_is_refused(world: World, tmp_path: Path) -> None:
    bf16 = copy_owner(world, "news", tmp_path / "bf16")
    rewrite_tensors(bf16, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    merge_error(tmp_path / "out", [world.owners["code"].path, bf16], "model.embed_tokens.weight",
                "(float32 vs bfloat16)")


def test_owner_of_another_public_model_is_refused(world: World, tokenizer, tmp_path: Path) -> None:
    public_config = tiny_flexolmo_config(vocab_size=len(tokenizer), num_experts=1, num_experts_per_tok=1)
    other_public = build_flexolmo(public_config, seed=1)
    foreign = save(derive_owner(other_public, seed=30), tmp_path / "foreign", tokenizer)
    merge_error(tmp_path / "out", [*world.dirs("code", "news"), foreign],
                "model.embed_tokens.weight", str(foreign / "model.safetensors"), "same public model")


@pytest.mark.parametrize(
    ("field", "value"), [("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 3)]
)
def test_other_architecture_is_refused(world: World, tokenizer, tmp_path: Path, field: str, value: int) -> None:
    config = tiny_flexolmo_config(vocab_size=len(tokenizer), num_experts=2, num_experts_per_tok=2, **{field: value})
    other = save(build_flexolmo(config, seed=0), tmp_path / "other", tokenizer)
    merge_error(tmp_path / "out", [*world.dirs("code"), other], str(other), f"{field} is {value}",
                str(world.owners["code"].path))


@pytest.mark.parametrize(
    ("owner", "key", "value"),
    [
        ("math", expert_file_key(1, 1, "up_proj"), float("nan")),  # the owner's own expert
        ("math", "model.layers.1.self_attn.k_proj.weight", float("inf")),  # a shared tensor of the second input
        (LOW_RANK_NAME, expert_file_key(0, 1, "down_proj", "_b"), float("nan")),  # a low-rank factor
    ],
)
def test_nan_or_inf_is_refused(world: World, tmp_path: Path, owner: str, key: str, value: float) -> None:
    bad = copy_owner(world, owner, tmp_path / "bad")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        t = tensors[key].clone()
        t[0, 0] = value
        tensors[key] = t

    rewrite_tensors(bad, poison)
    merge_error(tmp_path / "out", [world.owners["code"].path, bad], f"{bad / 'model.safetensors'}: tensor {key}",
                "NaN or Inf")


def test_names_are_checked(world: World, tmp_path: Path) -> None:
    owners = world.dirs("code", "news")
    out = tmp_path / "out"
    merge_error(out, owners, "--names", "3 names", "2 owners", names=["a", "b", "c"])
    merge_error(out, owners, "--names", "unique", names=["a", "a"])
    merge_error(out, owners, "--names", "'public'", names=["public", "b"])
    # two owners whose directories share a name and whose configs name nothing: the default collides
    twin = copy_owner(world, "code", tmp_path / "elsewhere" / "code")
    merge_error(out, [world.owners["code"].path, twin], str(twin), "'code'", "--names")
    merge_experts(out, [world.owners["code"].path, twin], names=["code", "code2"])  # and --names resolves it


def test_expert_counts_are_checked(world: World, flexolmo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge_error(out, [], "no inputs")
    merge_error(out, [world.public_dir], str(world.public_dir), "at least one owner")
    merge_error(out, [world.owners["code"].path, world.public_dir], str(world.public_dir), "public model goes first")
    merge_error(out, [world.owners["code"].path, flexolmo_dir], str(flexolmo_dir), "has 4 experts")
    merge_error(out, [flexolmo_dir, world.owners["code"].path], str(flexolmo_dir), "has 4 experts")
    merge_error(out, world.dirs("code"), "--top-k 3", "(2)", top_k=3)


def test_out_must_not_be_an_input(world: World, tmp_path: Path) -> None:
    owner = copy_owner(world, "code", tmp_path / "code")
    before = snapshot(owner)
    with pytest.raises(FlexmoreError, match="is also an input"):
        merge_experts(owner, [owner, world.owners["news"].path], overwrite=True)
    assert snapshot(owner) == before


# --------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("FLEXMORE_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: object) -> Result:
        monkeypatch.setattr(sys, "argv", ["flexmore", *map(str, args)])
        capsys.readouterr()
        code: int | str | None = 0
        try:
            cli.main()
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return Result(0 if code is None else code if isinstance(code, int) else 1, captured.out, captured.err)

    return run


def test_cli_merge(run_cli, world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    inputs = [world.public_dir, *world.dirs("code", LOW_RANK_NAME)]
    result = run_cli("merge", out, *inputs, "--names", "c,l", "--top-k", "3")
    assert result.code == 0, result.err
    assert f"wrote {out}" in result.err and "flexmore" in result.err and f"l:{RANK}" in result.err
    config = json.loads((out / "config.json").read_text())
    assert config["expert_names"] == ["public", "c", "l"] and config["num_experts_per_tok"] == 3
    assert_layout(out, world, ["code", LOW_RANK_NAME])


def test_cli_refuses_existing_out_then_overwrites(run_cli, world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious\n")
    before = snapshot(out)
    inputs = world.dirs("code", "news")
    assert_one_error_line(run_cli("merge", out, *inputs), str(out), "--overwrite")
    assert snapshot(out) == before and leftovers(out) == []

    bad = copy_owner(world, "news", tmp_path / "bad")
    key = "model.layers.1.self_attn.o_proj.weight"
    rewrite_tensors(bad, bump(key))
    assert_one_error_line(run_cli("merge", out, inputs[0], bad, "--overwrite"), key, str(bad / "model.safetensors"))
    assert snapshot(out) == before and leftovers(out) == []  # even --overwrite keeps OUT when the merge fails

    assert run_cli("-q", "merge", out, *inputs, "--overwrite").code == 0
    assert "keep.txt" not in snapshot(out) and json.loads((out / "config.json").read_text())["num_experts"] == 3
    assert leftovers(out) == []


def test_cli_bad_input_is_one_error_line(run_cli, world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_one_error_line(run_cli("merge", out, *world.dirs("code", "news"), "--names", "a"), "--names", "1 names")
    assert_one_error_line(run_cli("merge", out, world.public_dir), "at least one owner")
    assert_one_error_line(run_cli("merge", out, world.owners["code"].path, tmp_path / "nowhere"), "nowhere")
    assert run_cli("merge", out).code == 2  # no inputs at all: a usage error
    assert not out.exists() and leftovers(out) == []


def test_cli_help(run_cli) -> None:
    result = run_cli("merge", "--help")
    assert result.code == 0
    for option in ("--names", "--top-k", "--overwrite"):
        assert option in result.out
