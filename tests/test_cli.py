"""The `flexmore` command line, driven through `flexmore.cli.main()` as a user would run it.

`main()` (not the Typer `app`) turns a `FlexmoreError` into one line on stderr and exit code 2, so
every test goes through it: in-process with a patched `sys.argv` (fast), plus one real subprocess of
`python -m flexmore.cli` to check the wiring end to end.

Properties checked:
  bad input   one `error:` line naming the file / tensor / option, exit 2, no traceback, and nothing on
              disk destroyed: an existing OUT keeps its exact contents even under --overwrite, and no
              `.OUT.tmp-*` / `.OUT.old-*` sibling is left behind;
  info        parameter and byte counts equal those of the built modules;
  convert     opt-out, names and top-k land in the config, tensors are copied bit for bit, tokenizer
              files travel, and `--to flexolmo` loads in stock transformers with the same outputs;
  --help      every command exits 0 and lists its options.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FlexOlmoForCausalLM

from flexmore import cli
from flexmore.checkpoint import CheckpointReader
from flexmore.config import FlexMoREConfig
from flexmore.errors import FlexmoreError
from flexmore.modeling import FlexMoREForCausalLM
from flexmore.tiny import build_flexmore, build_flexolmo, build_tokenizer, stdlib_text, tiny_flexolmo_config

H, I, L = 32, 64, 2  # hidden, intermediate, layers of tiny_flexolmo_config: the parameter formulas use them
MIXED_NAMES = ["public", "math", "code", "news"]
MIXED_RANKS = [0, 4, 8, 0]  # low-rank, another low rank, and a full-size domain expert
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ROUTER = "model.layers.{layer}.mlp.gate.weight"


# --------------------------------------------------------------------------------------------------
# Fixtures: one tiny world per module, checkpoints written once and only ever copied before mutation


@dataclass(frozen=True)
class World:
    flexolmo: FlexOlmoForCausalLM
    flexolmo_dir: Path  # FlexOlmo checkpoint as transformers writes it, default expert names
    mixed: FlexMoREForCausalLM
    mixed_dir: Path  # FlexMoRE checkpoint with MIXED_RANKS / MIXED_NAMES


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("cli-world")
    tokenizer = build_tokenizer(stdlib_text(60_000), vocab_size=300)
    config = tiny_flexolmo_config(vocab_size=len(tokenizer), hidden_size=H, intermediate_size=I, num_hidden_layers=L)
    flexolmo = build_flexolmo(config, seed=0)
    flexolmo.save_pretrained(root / "flexolmo")
    tokenizer.save_pretrained(root / "flexolmo")
    mixed = build_flexmore(FlexMoREConfig.from_flexolmo(config, MIXED_RANKS, MIXED_NAMES), seed=1)
    mixed.save_pretrained(root / "mixed")
    tokenizer.save_pretrained(root / "mixed")
    return World(flexolmo, root / "flexolmo", mixed, root / "mixed")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def flexmore(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    """Run `flexmore ARGS...` in-process through `cli.main()`; returns exit code, stdout and stderr."""
    monkeypatch.delenv("FLEXMORE_DEBUG", raising=False)  # would turn errors into tracebacks
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps help and tables at the terminal width

    def run(*args: object) -> Result:
        monkeypatch.setattr(sys, "argv", ["flexmore", *map(str, args)])
        capsys.readouterr()
        code: int | str | None = 0
        try:
            cli.main()
        except SystemExit as exc:  # click exits even on success
            code = exc.code
        captured = capsys.readouterr()
        # sys.exit(None) is success, sys.exit("message") a failure with exit status 1
        status = 0 if code is None else code if isinstance(code, int) else 1
        return Result(status, captured.out, captured.err)

    return run


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def existing_out(tmp_path: Path) -> Path:
    """An OUT that a failed run must leave exactly as it was."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious results\n")
    (out / "sub" / "model.safetensors").write_bytes(b"not really a model")
    return out


def leftovers(out: Path) -> list[Path]:
    """Temporary (`.OUT.tmp-PID`) or moved-aside (`.OUT.old-PID`) siblings of OUT."""
    return sorted(out.parent.glob(f".{out.name}.*"))


def assert_one_error_line(result: Result, *mentions: str) -> None:
    """A user-facing failure: exit 2, no traceback, one `error:` line mentioning every string given."""
    assert result.code == 2, result
    assert "Traceback" not in result.err
    assert len(result.err_lines) == 1, result.err
    line = result.err_lines[0]
    assert line.startswith("error: "), line
    for text in mentions:
        assert text in line, f"{text!r} not in {line!r}"


def rewrite_tensors(ckpt: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def edit_config(ckpt: Path, edit: Callable[[dict], None]) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    edit(config)
    (ckpt / "config.json").write_text(json.dumps(config))


def as_flexmore(expert_ranks: list[int]) -> Callable[[dict], None]:
    """A config edit that turns the FlexOlmo config into a FlexMoRE one with these ranks."""
    return lambda c: c.update(model_type="flexmore", expert_ranks=expert_ranks)


# --------------------------------------------------------------------------------------------------
# 1. Bad checkpoints: each case damages a copy of the FlexOlmo checkpoint and says what the message names

MISSING = "model.layers.1.mlp.experts.2.up_proj.weight"


def _truncate(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


BAD_CHECKPOINTS: dict[str, tuple[Callable[[Path], None], Callable[[Path], list[str]]]] = {
    "no-config": (lambda c: (c / "config.json").unlink(), lambda c: [str(c), "not a checkpoint", "config.json"]),
    "llama": (
        lambda c: edit_config(c, lambda d: d.update(model_type="llama")),
        lambda c: [str(c / "config.json"), "'llama'"],
    ),
    "invalid-json": (lambda c: (c / "config.json").write_text("{not json"), lambda c: [str(c / "config.json"), "JSON"]),
    "missing-tensor": (lambda c: rewrite_tensors(c, lambda t: t.pop(MISSING)), lambda c: [str(c), MISSING, "missing"]),
    "misshaped-router": (
        # one router row too many: a 5th expert the config does not know about
        lambda c: rewrite_tensors(c, lambda t: t.update({ROUTER.format(layer=0): torch.zeros(5, H)})),
        lambda c: [str(c / "model.safetensors"), ROUTER.format(layer=0), f"[5, {H}]", f"[4, {H}]"],
    ),
    "truncated": (_truncate, lambda c: [str(c / "model.safetensors"), "truncated"]),
    "ranks-wrong-length": (
        lambda c: edit_config(c, as_flexmore(expert_ranks=[0, 0, 0])),
        lambda c: [str(c / "config.json"), "expert_ranks", "3 entries", "num_experts is 4"],
    ),
    "negative-rank": (
        lambda c: edit_config(c, as_flexmore(expert_ranks=[0, -1, 0, 0])),
        lambda c: [str(c / "config.json"), "'expert1'", "-1"],
    ),
    "rank-on-public": (
        lambda c: edit_config(c, as_flexmore(expert_ranks=[4, 0, 0, 0])),
        lambda c: [str(c / "config.json"), "public", "rank 4"],
    ),
    "rank-above-max": (
        lambda c: edit_config(c, as_flexmore(expert_ranks=[0, H + 1, 0, 0])),
        lambda c: [str(c / "config.json"), "'expert1'", str(H + 1)],
    ),
}


@pytest.fixture(params=sorted(BAD_CHECKPOINTS))
def bad_checkpoint(request: pytest.FixtureRequest, world: World, tmp_path: Path) -> tuple[Path, list[str]]:
    damage, mentions = BAD_CHECKPOINTS[request.param]
    ckpt = tmp_path / "bad"
    shutil.copytree(world.flexolmo_dir, ckpt)
    damage(ckpt)
    return ckpt, mentions(ckpt)


def test_info_rejects_bad_checkpoint(flexmore, bad_checkpoint: tuple[Path, list[str]]) -> None:
    ckpt, mentions = bad_checkpoint
    result = flexmore("info", ckpt, "--json")
    assert_one_error_line(result, *mentions)
    assert result.out == ""  # no half-printed description


def test_convert_of_bad_checkpoint_keeps_existing_out(
    flexmore, bad_checkpoint: tuple[Path, list[str]], existing_out: Path
) -> None:
    ckpt, mentions = bad_checkpoint
    before = snapshot(existing_out)
    # --overwrite gives it every permission to replace OUT: a failed run still must not.
    result = flexmore("convert", ckpt, existing_out, "--to", "flexmore", "--overwrite")
    assert_one_error_line(result, *mentions)
    assert snapshot(existing_out) == before
    assert leftovers(existing_out) == []


def test_info_of_missing_directory(flexmore, tmp_path: Path) -> None:
    assert_one_error_line(flexmore("info", tmp_path / "nowhere"), str(tmp_path / "nowhere"), "no such directory")


# --------------------------------------------------------------------------------------------------
# 1. Bad options


@pytest.mark.parametrize(
    ("spec", "mentions"),
    [
        ("math=abc", ["--ranks", "math", "'abc'"]),
        ("math=-1", ["--ranks", "math", "'-1'"]),
        ("nosuch=4", ["--ranks", "'nosuch'", "public, math, code, news"]),  # lists the valid names
        ("public=4", ["--ranks", "'public'", "public expert"]),
        ("0=4", ["--ranks", "'0'", "public expert"]),  # the public expert by index
        ("math=4,math=8", ["--ranks", "'math'", "twice"]),
        (str(min(H, I) + 1), ["--ranks", f"rank {min(H, I) + 1}", str(min(H, I))]),
        (f"code={min(H, I) + 1}", ["--ranks", "'code'", str(min(H, I))]),
    ],
)
def test_info_rejects_bad_rank_spec(flexmore, world: World, spec: str, mentions: list[str]) -> None:
    result = flexmore("info", world.mixed_dir, "--ranks", spec)
    assert_one_error_line(result, *mentions)
    assert result.out == ""


@pytest.mark.parametrize(
    ("options", "mentions"),
    [
        (["--drop-expert", "public"], ["--drop-expert", "public", "cannot be opted out"]),
        (["--drop-expert", "0"], ["--drop-expert", "public", "cannot be opted out"]),
        (["--drop-expert", "nosuch"], ["--drop-expert", "'nosuch'", "public, expert1, expert2, expert3"]),
        (["--drop-expert", "4"], ["--drop-expert", "'4'"]),  # one past the last index
        (["--top-k", "0"], ["--top-k 0", "between 1 and", "(4)"]),
        (["--top-k", "99"], ["--top-k 99", "between 1 and", "(4)"]),
        (["--drop-expert", "expert1", "--top-k", "4"], ["--top-k 4", "(3)"]),  # k checked against experts left
        (["--names", "public,a,a,c"], ["--names", "unique"]),
    ],
)
def test_convert_rejects_bad_option(
    flexmore, world: World, existing_out: Path, options: list[str], mentions: list[str]
) -> None:
    before = snapshot(existing_out)
    result = flexmore("convert", world.flexolmo_dir, existing_out, "--to", "flexmore", "--overwrite", *options)
    assert_one_error_line(result, *mentions)
    assert snapshot(existing_out) == before
    assert leftovers(existing_out) == []


def test_convert_error_creates_no_out(flexmore, world: World, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    assert_one_error_line(flexmore("convert", world.flexolmo_dir, out, "--to", "flexmore", "--top-k", "0"), "--top-k")
    assert not out.exists()
    assert leftovers(out) == []


def test_bad_choice_is_a_usage_error_without_traceback(flexmore, world: World, tmp_path: Path) -> None:
    result = flexmore("convert", world.flexolmo_dir, tmp_path / "out", "--to", "nosuch")
    assert result.code == 2
    assert "Traceback" not in result.err
    assert "--to" in result.err and "nosuch" in result.err
    assert not (tmp_path / "out").exists()


# Options at fault are named, and an error is exactly one line.


def test_bad_names_count_names_the_option(flexmore, world: World, tmp_path: Path) -> None:
    result = flexmore("convert", world.flexolmo_dir, tmp_path / "out", "--to", "flexmore", "--names", "public,a,b")
    assert_one_error_line(result, "--names")


def test_bad_dtype_names_the_option(flexmore, world: World, tmp_path: Path) -> None:
    result = flexmore("convert", world.flexolmo_dir, tmp_path / "out", "--to", "flexmore", "--dtype", "nosuch")
    assert_one_error_line(result, "--dtype", "'nosuch'")


def test_convert_error_is_exactly_one_line(flexmore, world: World, tmp_path: Path) -> None:
    result = flexmore("convert", world.flexolmo_dir, tmp_path / "out", "--to", "flexmore", "--top-k", "0")
    assert result.err.count("\n") == 1 and result.err.startswith("error: ")


def test_debug_shows_the_exception(flexmore, world: World) -> None:
    """--debug is the documented way to get the traceback: main() re-raises instead of exiting."""
    with pytest.raises(FlexmoreError, match="public expert"):
        flexmore("--debug", "info", world.mixed_dir, "--ranks", "public=4")


# --------------------------------------------------------------------------------------------------
# 1. OUT already exists; a run that fails halfway


def test_convert_refuses_existing_out_without_overwrite(flexmore, world: World, existing_out: Path) -> None:
    before = snapshot(existing_out)
    result = flexmore("convert", world.flexolmo_dir, existing_out, "--to", "flexmore")
    assert_one_error_line(result, str(existing_out), "--overwrite")
    assert snapshot(existing_out) == before
    assert leftovers(existing_out) == []


def test_convert_overwrite_replaces_out(flexmore, world: World, existing_out: Path) -> None:
    result = flexmore("convert", world.flexolmo_dir, existing_out, "--to", "flexmore", "--overwrite")
    assert result.code == 0, result.err
    files = set(snapshot(existing_out))
    assert "keep.txt" not in files and "sub/model.safetensors" not in files  # replaced, not merged into
    assert {"config.json", "model.safetensors", "flexmore.json"} <= files
    assert json.loads((existing_out / "config.json").read_text())["model_type"] == "flexmore"
    assert leftovers(existing_out) == []


def test_failure_while_writing_keeps_existing_out(
    flexmore, world: World, existing_out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor that cannot be read after some were written: the temporary output goes, OUT stays."""
    real_get = CheckpointReader.get
    reads = []

    def failing_get(self: CheckpointReader, name: str) -> torch.Tensor:
        reads.append(name)
        if len(reads) > 5:
            raise FlexmoreError(f"{self.file_of(name)}: cannot read tensor {name} (simulated I/O error)")
        return real_get(self, name)

    monkeypatch.setattr(CheckpointReader, "get", failing_get)
    before = snapshot(existing_out)
    result = flexmore("convert", world.flexolmo_dir, existing_out, "--to", "flexmore", "--overwrite")
    assert_one_error_line(result, "simulated I/O error", reads[-1])
    assert len(reads) == 6  # it failed mid-stream, after writing had begun
    assert snapshot(existing_out) == before
    assert leftovers(existing_out) == []


# --------------------------------------------------------------------------------------------------
# 2. flexmore info --json


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def info_json(flexmore, *args: object) -> dict:
    result = flexmore("info", *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_info_of_flexolmo_counts_the_built_model(flexmore, world: World) -> None:
    d = info_json(flexmore, world.flexolmo_dir)
    assert d["model_type"] == "flex_olmo"
    assert d["parameters"] == numel(world.flexolmo)
    assert d["dtype"] == "float32" and d["bytes"] == 4 * d["parameters"]
    assert d["parameters_all_full"] == d["parameters"] and d["saving"] == 0
    assert [x["rank"] for x in d["experts"]] == [0, 0, 0, 0]
    assert [x["parameters"] for x in d["experts"]] == [3 * H * I * L] * 4
    assert d["num_experts_per_tok"] == 2


def test_info_ranks_describes_the_low_rank_model(flexmore, world: World) -> None:
    rank = 4
    d = info_json(flexmore, world.flexolmo_dir, "--ranks", str(rank))
    assert [x["rank"] for x in d["experts"]] == [0, rank, rank, rank]
    assert [x["parameters"] for x in d["experts"]] == [3 * H * I * L] + [3 * rank * (H + I) * L] * 3
    # the same architecture with those ranks, built (on meta: shapes only) and counted
    config = FlexMoREConfig.from_flexolmo(world.flexolmo.config, expert_ranks=[0, rank, rank, rank])
    with torch.device("meta"):
        assert d["parameters"] == numel(FlexMoREForCausalLM(config))
    assert d["parameters_all_full"] == numel(world.flexolmo)
    assert d["saving"] == pytest.approx(1 - d["parameters"] / d["parameters_all_full"]) and d["saving"] > 0
    assert d["bytes"] == 4 * d["parameters"] and d["bytes_all_full"] == 4 * d["parameters_all_full"]


def test_info_of_mixed_flexmore_counts_the_built_model(flexmore, world: World) -> None:
    d = info_json(flexmore, world.mixed_dir)
    assert d["model_type"] == "flexmore"
    assert [(x["name"], x["rank"]) for x in d["experts"]] == list(zip(MIXED_NAMES, MIXED_RANKS))
    assert d["parameters"] == numel(world.mixed)
    per_expert = [3 * H * I * L if r == 0 else 3 * r * (H + I) * L for r in MIXED_RANKS]
    assert [x["parameters"] for x in d["experts"]] == per_expert
    assert d["bytes"] == 4 * d["parameters"]
    # --ranks changes only the experts it names
    d2 = info_json(flexmore, world.mixed_dir, "--ranks", "math=full,news=2")
    assert [x["rank"] for x in d2["experts"]] == [0, 0, 8, 2]


def test_info_bytes_follow_the_stored_dtype(flexmore, world: World, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert flexmore("-q", "convert", world.flexolmo_dir, out, "--to", "flexmore", "--dtype", "bfloat16").code == 0
    d = info_json(flexmore, out)
    assert d["dtype"] == "bfloat16"
    assert d["parameters"] == numel(world.flexolmo) and d["bytes"] == 2 * d["parameters"]


def test_info_table(flexmore, world: World) -> None:
    result = flexmore("info", world.mixed_dir)
    assert result.code == 0, result.err
    for name in MIXED_NAMES:
        assert name in result.out
    assert f"{numel(world.mixed):,}" in result.out
    assert "k): 2 of 4" in result.out


# --------------------------------------------------------------------------------------------------
# 3. flexmore convert


def test_convert_drop_expert_and_top_k(flexmore, world: World, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = flexmore(
        "convert", world.flexolmo_dir, out, "--to", "flexmore", "--names", "public,a,b,c", "--drop-expert", "b",
        "--top-k", "1",
    )
    assert result.code == 0, result.err
    assert "Traceback" not in result.err

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "flexmore"
    assert config["expert_names"] == ["public", "a", "c"]
    assert config["expert_ranks"] == [0, 0, 0]
    assert config["num_experts"] == 3 and config["num_experts_per_tok"] == 1
    meta = json.loads((out / "flexmore.json").read_text())
    assert meta["dropped_experts"] == ["b"] and "flexmore_version" in meta

    src, dst = load_file(world.flexolmo_dir / "model.safetensors"), load_file(out / "model.safetensors")
    kept = [0, 1, 3]
    for layer in range(L):
        router = ROUTER.format(layer=layer)
        assert torch.equal(dst[router], src[router][kept])  # bit for bit, rows in order
        for new, old in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"model.layers.{layer}.mlp.experts.{{}}.{proj}.weight"
                assert torch.equal(dst[key.format(new)], src[key.format(old)])
    assert not any(".experts.3." in k for k in dst)
    # non-expert tensors untouched
    assert torch.equal(dst["model.embed_tokens.weight"], src["model.embed_tokens.weight"])

    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (world.flexolmo_dir / name).read_bytes()
    assert leftovers(out) == []


def test_convert_to_flexolmo_loads_in_stock_transformers(flexmore, world: World, tmp_path: Path) -> None:
    out = tmp_path / "dense"
    result = flexmore(
        "convert", world.flexolmo_dir, out, "--to", "flexolmo", "--names", "public,a,b,c", "--drop-expert", "b",
        "--top-k", "1",
    )
    assert result.code == 0, result.err
    model, loading = FlexOlmoForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing / unexpected / mismatched keys
    assert model.config.model_type == "flex_olmo"
    assert model.config.num_experts == 3 and model.config.num_experts_per_tok == 1
    src = load_file(world.flexolmo_dir / "model.safetensors")
    for layer in range(L):
        router = ROUTER.format(layer=layer)
        assert torch.equal(model.state_dict()[router], src[router][[0, 1, 3]])


def test_convert_mixed_to_flexolmo_keeps_the_outputs(flexmore, world: World, tmp_path: Path) -> None:
    """Low-rank experts materialised as W_public + B A: stock FlexOlmo computes what FlexMoRE did."""
    out = tmp_path / "dense"
    assert flexmore("convert", world.mixed_dir, out, "--to", "flexolmo").code == 0
    dense = FlexOlmoForCausalLM.from_pretrained(out).eval()
    assert dense.config.num_experts == 4
    ids = torch.randint(2, world.mixed.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = world.mixed.eval()(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the names survive the dense export for later conversions (FlexOlmo's config has no field for them)
    assert json.loads((out / "flexmore.json").read_text())["expert_names"] == MIXED_NAMES
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (world.mixed_dir / name).read_bytes()


# --------------------------------------------------------------------------------------------------
# 4. --help


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ([], ["info", "convert", "demo", "--debug", "--quiet"]),
        (["info"], ["--ranks", "--json"]),
        (["convert"], ["--to", "--top-k", "--drop-expert", "--names", "--dtype", "--overwrite"]),
        (["demo"], ["--out", "--seed"]),
    ],
)
def test_help(flexmore, command: list[str], options: list[str]) -> None:
    result = flexmore(*command, "--help")
    assert result.code == 0, result.err
    for option in options:
        assert option in result.out, f"{option} missing from `flexmore {' '.join(command)} --help`"


# --------------------------------------------------------------------------------------------------
# End to end: the real entry point in a fresh interpreter (costs an import of torch + transformers)


def test_subprocess_error_is_one_line(world: World, tmp_path: Path) -> None:
    ckpt = tmp_path / "truncated"
    shutil.copytree(world.flexolmo_dir, ckpt)
    _truncate(ckpt)
    env = {k: v for k, v in os.environ.items() if k != "FLEXMORE_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "flexmore.cli", "info", str(ckpt)], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt / 'model.safetensors'}: truncated"), proc.stderr
    assert proc.stdout == ""
