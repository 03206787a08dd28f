"""Expert training (FlexOlmo recipe), domain embeddings and the `embed` / `train-expert` commands.

The world: a tiny public FlexOlmo (1 expert) pretrained for a few seconds on two domains of different
character (Python source from the stdlib, and generated arithmetic lines "12 + 7 = 19"), each domain
with a held-out split. Owners train experts on one domain each from that public model.

Properties checked:
  data        .txt split at blank lines, .jsonl "text" fields, directories expand; packing appends EOS,
              drops the tail; the public model is read from a checkpoint or an in-memory model alike;
  embedding   the batched, padded embedding equals one document at a time (mask-aware pooling); an
              external embedder is used as given and must have the public hidden size;
  start       the 2-expert model (full or low-rank with B = 0) computes the public model's logits;
  training    the expert lowers held-out loss on its own domain more than on the other; everything but
              expert 1 and router row 1 is bit-identical to the public model, router row 0 included;
  resume      interrupt + resume gives the uninterrupted run's weights bit for bit; checkpoints are
              safetensors + JSON only; a resume with other settings is refused;
  outputs     rank 0: a FlexOlmo checkpoint `flexmore merge` accepts with a second owner; rank R: a
              FlexMoRE checkpoint `load_model` loads; the training-only negative bias trains, and is
              absent from the export;
  CLI         embed and train-expert end to end; bad inputs give one error line and write nothing.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import FlexOlmoForCausalLM

from flexmore.checkpoint import CheckpointReader
from flexmore.convert import load_model
from flexmore.errors import FlexmoreError
from flexmore.merge import merge_experts
from flexmore.modeling import FlexMoREForCausalLM
from flexmore.tiny import build_flexolmo, build_tokenizer, stdlib_text, tiny_flexolmo_config
from flexmore.training import (
    TrainConfig,
    build_two_expert,
    domain_embedding,
    heldout_loss,
    load_public,
    load_texts,
    pack,
    train_expert,
)
from flexmore.training.embed import load_router_row
from flexmore.training.expert import train_dir
from tests.test_cli import assert_one_error_line, flexmore, leftovers  # noqa: F401  (fixture)

SEQ = 64
ROUTER = "model.layers.{layer}.mlp.gate.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
QUICK = dict(batch_size=8, seq_len=SEQ, lr=3e-3, warmup_steps=5, weight_decay=0.0)


def arithmetic_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(8):
            a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice("+-*")
            lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}")
        docs.append("\n".join(lines))
    return docs


@dataclass(frozen=True)
class World:
    root: Path
    public_dir: Path
    public: FlexOlmoForCausalLM
    tokenizer: object
    code_file: Path  # .txt, documents separated by blank lines
    math_file: Path  # .jsonl
    heldout: dict[str, list[str]]  # domain -> held-out documents


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("training-world")
    code = [d for src in stdlib_text(120_000) for d in src.split("\n\n") if d.strip()]
    random.Random(0).shuffle(code)  # held-out documents from every module, like the training ones
    math = arithmetic_docs(600, seed=0)
    tokenizer = build_tokenizer(stdlib_text(120_000) + math[:200], vocab_size=384)
    config = tiny_flexolmo_config(vocab_size=len(tokenizer), num_experts=1, num_experts_per_tok=1)
    public = build_flexolmo(config, seed=0)
    # A short pretraining on both domains, so the public model is a (weak) language model, not noise.
    mixed = code[:-60] + math[:-60]
    random.Random(0).shuffle(mixed)
    data = pack(mixed, tokenizer, SEQ)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(public.parameters(), lr=3e-3)
    public.train()
    for _ in range(100):
        batch = data[torch.randint(0, data.shape[0], (8,))]
        loss = public(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    public.eval()
    public_dir = root / "public"
    public.save_pretrained(public_dir)
    tokenizer.save_pretrained(public_dir)
    code_file, math_file = root / "code.txt", root / "math.jsonl"
    code_file.write_text("\n\n".join(code[:-60]) + "\n")
    math_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in math[:-60]))
    return World(root, public_dir, public, tokenizer, code_file, math_file,
                 {"code": code[-60:], "math": math[-60:]})


@pytest.fixture(scope="module")
def owners(world: World) -> dict[str, Path]:
    """Two full-size owners trained from the same public model, one per domain."""
    out = {}
    for domain, file in (("code", world.code_file), ("math", world.math_file)):
        out[domain] = train_expert(world.public_dir, [file], world.root / "owners" / domain,
                                   TrainConfig(steps=60, checkpoint_every=0, **QUICK))
    return out


@pytest.fixture(scope="module")
def low_rank_owner(world: World) -> Path:
    """A rank-4 owner trained with the negative router bias."""
    config = TrainConfig(steps=20, rank=4, negative_bias=True, checkpoint_every=0, expert_name="arith", **QUICK)
    return train_expert(world.public_dir, [world.math_file], world.root / "lowrank", config)


def public_tensors(world: World) -> CheckpointReader:
    return CheckpointReader(world.public_dir)


# --------------------------------------------------------------------------------------------------
# Data


def test_load_texts_reads_txt_jsonl_and_directories(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_text("first doc\nstill first\n\n\n  second doc, indented\n\n")
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "alpha"}\n\n{"text": "line\u2028sep", "id": 2}\n')
    (tmp_path / "d" / "ignored.md").write_text("not data")
    assert load_texts([tmp_path / "d"]) == ["alpha", "line\u2028sep", "first doc\nstill first", "  second doc, indented"]


def test_pack_appends_eos_and_drops_the_tail(world: World) -> None:
    tok = world.tokenizer
    docs = ["def f(x): return x", "1 + 2 = 3", "class A: pass"]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    flat = [t for doc in ids for t in (*doc, tok.eos_token_id)]
    packed = pack(docs, tok, 4)
    assert packed.dtype == torch.long and packed.shape == (len(flat) // 4, 4)
    assert packed.flatten().tolist() == flat[: packed.numel()]
    with pytest.raises(FlexmoreError, match=f"{len(flat)} tokens in 3 documents"):
        pack(docs, tok, len(flat) + 1)


def test_public_model_from_checkpoint_or_memory(world: World, flexolmo_dir: Path, flexolmo_model) -> None:
    """Expert 0 and router row 0 of a 4-expert checkpoint; the same from in-memory HF and FlexMoRE models."""
    from_dir = load_public(flexolmo_dir)
    assert from_dir.config.num_experts == 1 and from_dir.source == flexolmo_dir
    reader = CheckpointReader(flexolmo_dir)
    for layer in range(2):
        assert torch.equal(from_dir.state[ROUTER.format(layer=layer)], reader.get(ROUTER.format(layer=layer))[:1])
        key = f"model.layers.{layer}.mlp.experts.0.up_proj.weight"
        assert torch.equal(from_dir.state[key], reader.get(key))
    for model in (flexolmo_model, load_model(flexolmo_dir)):  # fused HF layout, FlexMoRE layout
        state = load_public(model).state
        assert state.keys() == from_dir.state.keys()
        assert all(torch.equal(state[k], from_dir.state[k]) for k in state)


# --------------------------------------------------------------------------------------------------
# Domain embeddings


def test_domain_embedding_is_the_mask_aware_mean(world: World) -> None:
    docs = world.heldout["code"][:5] + world.heldout["math"][:4]  # very different lengths: lots of padding
    public = load_public(world.public_dir).build()
    per_doc = []
    with torch.no_grad():
        for doc in docs:
            ids = world.tokenizer(doc, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :SEQ]
            per_doc.append(public.model(input_ids=ids).last_hidden_state[0].mean(0))  # one doc, no padding
    expected = torch.stack(per_doc).mean(0)
    got = domain_embedding(world.public_dir, docs, batch_size=4, seq_len=SEQ)
    assert got.shape == (public.config.hidden_size,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    subset = domain_embedding(world.public_dir, docs, max_docs=3, seq_len=SEQ)
    assert not torch.allclose(subset, got)


def test_external_embedder_must_have_the_public_hidden_size(world: World, tmp_path: Path) -> None:
    docs = world.heldout["math"][:6]
    # The public checkpoint read as an AutoModel is an embedder of the right size: same vectors as the default.
    external = domain_embedding(world.public_dir, docs, seq_len=SEQ, embedder=world.public_dir)
    torch.testing.assert_close(external, domain_embedding(world.public_dir, docs, seq_len=SEQ), atol=1e-5, rtol=1e-5)
    wide = tmp_path / "wide"
    build_flexolmo(tiny_flexolmo_config(vocab_size=len(world.tokenizer), hidden_size=48, num_experts=1,
                                        num_experts_per_tok=1)).save_pretrained(wide)
    world.tokenizer.save_pretrained(wide)
    with pytest.raises(FlexmoreError, match="hidden size is 48 but the public model's is 32"):
        domain_embedding(world.public_dir, docs, embedder=wide)


# --------------------------------------------------------------------------------------------------
# The 2-expert model and training


@pytest.mark.parametrize("rank", [0, 4])
def test_two_expert_model_starts_at_the_public_model(world: World, rank: int) -> None:
    row = torch.randn(32)
    model = build_two_expert(world.public_dir, rank, row, "domain")
    assert model.config.expert_ranks == [0, rank] and model.config.num_experts_per_tok == 2
    reader = public_tensors(world)
    for layer, block in enumerate(model.moe_blocks()):
        assert torch.equal(block.gate.weight[0], reader.get(ROUTER.format(layer=layer))[0])
        assert torch.equal(block.gate.weight[1], row)
        if rank:
            assert all(not getattr(block.experts[1], f"{p}_b").weight.any() for p in ("gate_proj", "up_proj", "down_proj"))
            assert getattr(block.experts[1], "gate_proj_a").weight.abs().sum() > 0
    ids = pack(world.heldout["code"][:3], world.tokenizer, SEQ)[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, world.public(ids).logits, atol=1e-5, rtol=1e-5)


def test_expert_lowers_loss_on_its_own_domain_more(world: World, owners: dict[str, Path]) -> None:
    public = {d: heldout_loss(world.public_dir, texts, SEQ) for d, texts in world.heldout.items()}
    for domain, other in (("code", "math"), ("math", "code")):
        gain = {d: public[d] - heldout_loss(owners[domain], world.heldout[d], SEQ) for d in (domain, other)}
        assert gain[domain] > 0.01, (domain, gain)
        assert gain[domain] > gain[other] + 0.05, (domain, gain)


def assert_frozen(world: World, ckpt: Path, rank: int) -> None:
    """Everything but expert 1 and router row 1 is the public model's, bit for bit."""
    public, owner = public_tensors(world), CheckpointReader(ckpt)
    expert1 = [k for k in owner.keys() if ".mlp.experts.1." in k]
    assert len(expert1) == 2 * 3 * (2 if rank else 1)
    assert all(not torch.equal(owner.get(k), public.get(k.replace(".experts.1.", ".experts.0.")))
               for k in expert1 if not rank)  # the full expert moved away from the public FFN
    for key in owner.keys():
        if key in expert1:
            continue
        if key.endswith(".mlp.gate.weight"):
            router = owner.get(key)  # [2, H]
            assert torch.equal(router[0], public.get(key)[0]), key
            continue
        assert torch.equal(owner.get(key), public.get(key)), key
    assert set(public.keys()) <= set(owner.keys())


def test_frozen_weights_are_bit_identical(world: World, owners: dict[str, Path]) -> None:
    ckpt = owners["code"]
    assert_frozen(world, ckpt, rank=0)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "flex_olmo"
    meta = json.loads((ckpt / "flexmore.json").read_text())
    assert meta["expert_names"] == ["public", "code"] and meta["train_config"]["steps"] == 60
    for name in TOKENIZER_FILES:
        assert (ckpt / name).read_bytes() == (world.public_dir / name).read_bytes()
    # router row 1 started at the domain embedding and was trained away from it
    start = domain_embedding(world.public_dir, load_texts([world.code_file]), seq_len=SEQ)
    assert not torch.equal(CheckpointReader(ckpt).get(ROUTER.format(layer=0))[1], start)
    assert not train_dir(ckpt).exists()


def test_full_rank_owners_merge(world: World, owners: dict[str, Path], tmp_path: Path) -> None:
    result = merge_experts(tmp_path / "merged", [world.public_dir, owners["code"], owners["math"]])
    assert result.target == "flexolmo" and result.expert_names == ["public", "code", "math"]
    merged = CheckpointReader(tmp_path / "merged").get(ROUTER.format(layer=1))
    for slot, domain in ((1, "code"), (2, "math")):
        assert torch.equal(merged[slot], CheckpointReader(owners[domain]).get(ROUTER.format(layer=1))[1])
    assert load_model(tmp_path / "merged").config.num_experts == 3


def test_low_rank_expert_is_a_flexmore_checkpoint(world: World, low_rank_owner: Path) -> None:
    config = json.loads((low_rank_owner / "config.json").read_text())
    assert config["model_type"] == "flexmore" and config["expert_ranks"] == [0, 4]
    assert config["expert_names"] == ["public", "arith"]
    model = load_model(low_rank_owner)
    assert isinstance(model, FlexMoREForCausalLM) and model.config.expert_ranks == [0, 4]
    assert model.moe_blocks()[0].experts[1].up_proj_b.weight.abs().sum() > 0  # B trained away from zero
    assert_frozen(world, low_rank_owner, rank=4)


def test_negative_bias_is_not_exported(world: World, low_rank_owner: Path) -> None:
    keys = CheckpointReader(low_rank_owner).keys()
    assert not [k for k in keys if "bias" in k]
    assert json.loads((low_rank_owner / "flexmore.json").read_text())["train_config"]["negative_bias"] is True


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("rank,negative_bias", [(0, False), (4, True)])
def test_resume_gives_the_uninterrupted_weights(world: World, tmp_path: Path, rank: int, negative_bias: bool) -> None:
    config = TrainConfig(steps=10, checkpoint_every=3, rank=rank, negative_bias=negative_bias, expert_name="m",
                         **QUICK)
    straight = train_expert(world.public_dir, [world.math_file], tmp_path / "straight", config)

    out = tmp_path / "resumed"
    losses: list[tuple[int, float]] = []

    def stop_at_7(step: int, loss: float, tokens_per_s: float) -> None:
        losses.append((step, loss))
        assert tokens_per_s > 0
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_expert(world.public_dir, [world.math_file], out, config, on_step=stop_at_7)
    assert not out.exists()
    (last,) = train_dir(out).iterdir()  # only the newest checkpoint is kept
    assert last.name == "step-00000006"
    assert sorted(p.name for p in last.iterdir()) == ["state.json", "state.safetensors"]  # no pickle
    state = load_file(last / "state.safetensors")
    assert json.loads((last / "state.json").read_text())["step"] == 6
    assert {"adam/model.layers.0.mlp.gate.weight/exp_avg", "adam/model.layers.0.mlp.gate.weight/step",
            "rng/torch"} <= state.keys()
    biases = [v for k, v in state.items() if k.startswith("param/") and k.endswith("negative_bias")]
    assert len(biases) == (2 if negative_bias else 0)
    assert all(b.abs().sum() > 0 for b in biases)  # the bias is trained

    with pytest.raises(FlexmoreError, match="--resume"):
        train_expert(world.public_dir, [world.math_file], out, config)
    with pytest.raises(FlexmoreError, match="--lr"):
        train_expert(world.public_dir, [world.math_file], out, TrainConfig(**{**config.__dict__, "lr": 1e-3}),
                     resume=True)
    resumed_steps: list[int] = []
    train_expert(world.public_dir, [world.math_file], out, config, resume=True,
                 on_step=lambda step, loss, tps: resumed_steps.append(step))
    assert resumed_steps == [7, 8, 9, 10]
    a, b = CheckpointReader(straight), CheckpointReader(out)
    assert a.keys() == b.keys()
    for key in a.keys():
        assert torch.equal(a.get(key), b.get(key)), key
    assert not train_dir(out).exists()


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_embed_then_train_expert(world: World, flexmore, tmp_path: Path) -> None:  # noqa: F811
    row = tmp_path / "rows" / "math.safetensors"
    result = flexmore("embed", world.public_dir, world.math_file, "--out", row, "--max-docs", 50, "--seq-len", SEQ)
    assert result.code == 0, result.err
    meta = json.loads(row.with_suffix(".json").read_text())
    assert meta["documents"] == 50 and meta["hidden_size"] == 32 and "flexmore_version" in meta
    expected = domain_embedding(world.public_dir, load_texts([world.math_file]), max_docs=50, seq_len=SEQ)
    assert torch.equal(load_router_row(row, 32), expected)

    out = tmp_path / "owner"
    result = flexmore("--quiet", "train-expert", world.public_dir, world.math_file, out, "--steps", 4,
                      "--batch-size", 4, "--seq-len", SEQ, "--warmup-steps", 1, "--rank", 2, "--router-init", row,
                      "--name", "arith", "--checkpoint-every", 2)
    assert result.code == 0, result.err
    assert "wrote" in result.err and "arith:2" in result.err
    model = load_model(out)
    assert model.config.expert_names == ["public", "arith"] and model.config.expert_ranks == [0, 2]
    assert json.loads((out / "flexmore.json").read_text())["train_config"]["router_init"] == str(row)
    assert not train_dir(out).exists()


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def big_tokenizer_public(world: World, tmp: Path) -> Path:
    """The public checkpoint with a tokenizer of more tokens than its embedding has rows."""
    public = tmp / "public-bigtok"
    shutil.copytree(world.public_dir, public)
    for name in TOKENIZER_FILES:
        (public / name).unlink()
    build_tokenizer(stdlib_text(60_000), vocab_size=500).save_pretrained(public)
    return public


def wide_embedder(world: World, tmp: Path) -> Path:
    path = tmp / "wide"
    build_flexolmo(tiny_flexolmo_config(vocab_size=len(world.tokenizer), hidden_size=48, num_experts=1,
                                        num_experts_per_tok=1)).save_pretrained(path)
    world.tokenizer.save_pretrained(path)
    return path


def short_row(tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"router_row": torch.zeros(16)}, str(tmp / "row.safetensors"))
    return tmp / "row.safetensors"


def bad_input(case: str, w: World, t: Path) -> tuple[list, list[str]]:
    """(command line, what its one error line must mention) of each bad-input case."""
    if case == "missing-path":
        return ["train-expert", w.public_dir, t / "nope.jsonl"], [str(t / "nope.jsonl"), "no such file"]
    if case == "empty-file":
        empty = write(t / "empty.jsonl", "\n\n")
        return ["train-expert", w.public_dir, w.math_file, empty], [str(empty), "empty"]
    if case == "not-utf8":
        binary = write(t / "bin.txt", b"ok\n\n\xff\xfe broken")
        return ["train-expert", w.public_dir, binary], [str(binary), "UTF-8"]
    if case == "bad-jsonl-line":
        bad = write(t / "bad.jsonl", '{"text": "a"}\n\n{"txt": "b"}\n')
        return ["embed", w.public_dir, bad], [f"{bad}:3", '"text"']
    if case == "too-little-text":
        return ["train-expert", w.public_dir, write(t / "tiny.txt", "x = 1\n")], ["tokens", "--seq-len 64"]
    if case == "tokenizer-mismatch":
        return (["train-expert", big_tokenizer_public(w, t), w.math_file],
                ["tokenizer mismatch", "500 tokens", "384 rows"])
    if case == "embedder-size":
        return ["embed", w.public_dir, w.math_file, "--embedder", wide_embedder(w, t)], ["--embedder", "48", "32"]
    if case == "rank-too-large":
        return ["train-expert", w.public_dir, w.math_file, "--rank", 33], ["--rank 33", "32"]
    if case == "router-init-size":
        row = short_row(t)
        return ["train-expert", w.public_dir, w.math_file, "--router-init", row], [str(row), "[16]", "[32]"]
    if case == "bad-device":
        return ["train-expert", w.public_dir, w.math_file, "--device", "abacus"], ["--device", "abacus"]
    raise AssertionError(case)


BAD_INPUTS = ["missing-path", "empty-file", "not-utf8", "bad-jsonl-line", "too-little-text", "tokenizer-mismatch",
              "embedder-size", "rank-too-large", "router-init-size", "bad-device"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line(world: World, flexmore, tmp_path: Path, case: str) -> None:  # noqa: F811
    args, mentions = bad_input(case, world, tmp_path)
    out = tmp_path / ("out.safetensors" if args[0] == "embed" else "out")
    trailing = [out, "--seq-len", SEQ] if args[0] == "train-expert" else ["--out", out]
    result = flexmore(*args, *trailing)
    assert_one_error_line(result, *mentions)
    assert not out.exists() and not leftovers(out) and not train_dir(out).exists()


def test_existing_output_is_refused_before_training(world: World, flexmore, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = flexmore("train-expert", world.public_dir, world.math_file, out, "--seq-len", SEQ)
    assert_one_error_line(result, str(out), "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
