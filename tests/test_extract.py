"""PHLoRA extraction: SVD properties, rank policies, the streaming pipeline, its cache and its errors."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import FlexOlmoForCausalLM

from flexmore import FlexmoreError
from flexmore.checkpoint import CheckpointReader
from flexmore.config import break_even_rank
from flexmore.convert import convert_checkpoint, load_model
from flexmore.extract import SvdSettings, extract, truncated_svd
from flexmore.extract.pipeline import SvdCache, assemble_from_cache, build_svd_cache
from flexmore.extract.ranks import Energy, Fixed, Spectrum, allocate_budget, parse_budget, resolve_ranks
from flexmore.tiny import build_flexolmo

from .conftest import NAMES
from .test_cli import assert_one_error_line, flexmore, leftovers  # noqa: F401 - flexmore is a fixture


def low_rank(out: int, inp: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)


def slow_spectrum(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """A delta with singular values decaying like i^-0.5, as trained experts' deltas do."""
    g = torch.Generator().manual_seed(seed)
    n = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, n, generator=g))
    s = torch.arange(1, n + 1, dtype=torch.float32) ** -0.5
    return (u * s) @ v.T


# ------------------------------------------------------------------------------------------------- SVD


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_known_rank_recovered_exactly_at_rank_and_not_below(method):
    d = low_rank(96, 160, 7)
    f = truncated_svd(d, 7, method=method)
    b, a = f.factors(7)
    assert b.shape == (96, 7) and a.shape == (7, 160)
    assert torch.linalg.norm(d - b @ a) / torch.linalg.norm(d) < 1e-5
    assert f.relative_error(7) < 1e-3
    f6 = truncated_svd(d, 6, method=method)
    b6, a6 = f6.factors(6)
    assert torch.linalg.norm(d - b6 @ a6) / torch.linalg.norm(d) > 1e-2


def test_symmetric_split_and_reported_error_is_the_true_error():
    d = slow_spectrum(64, 176)
    f = truncated_svd(d, 64, method="exact")
    b, a = f.factors(10)
    assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-4, atol=1e-6)  # sqrt(S) on both sides, no alpha/r
    true = float(torch.linalg.norm(d - b @ a) / torch.linalg.norm(d))
    assert abs(true - f.relative_error(10)) < 1e-4
    assert abs(f.retained_energy(10) + f.relative_error(10) ** 2 - 1) < 1e-9


def test_randomized_within_one_percent_of_exact_on_a_slow_spectrum():
    d = slow_spectrum(512, 1408)
    exact = truncated_svd(d, 512, method="exact")
    for rank in (16, 64):
        rand = truncated_svd(d, rank, method="randomized", seed=0)
        b, a = rand.factors(rank)
        err = float(torch.linalg.norm(d - b @ a) / torch.linalg.norm(d))
        assert err <= 1.01 * exact.relative_error(rank)
        assert err >= exact.relative_error(rank) * (1 - 1e-5)  # Eckart-Young: exact is optimal


def test_randomized_is_reproducible_under_a_seed():
    d = slow_spectrum(128, 200)
    one, two = truncated_svd(d, 8, "randomized", seed=3), truncated_svd(d, 8, "randomized", seed=3)
    assert torch.equal(one.U, two.U) and torch.equal(one.S, two.S)
    assert not torch.equal(truncated_svd(d, 8, "randomized", seed=4).U, one.U)


def test_half_precision_is_upcast():
    d = slow_spectrum(64, 96).to(torch.bfloat16)
    f = truncated_svd(d, 8, method="exact", compute_dtype=torch.float64)
    assert f.U.dtype == torch.float32
    ref = torch.linalg.svdvals(d.double())
    assert_close(f.S[:8].double(), ref[:8], rtol=1e-5, atol=1e-7)


def test_auto_method_by_rank():
    from flexmore.extract.svd import choose_method

    assert choose_method(64, (4096, 11008)) == "randomized"
    assert choose_method(1024, (4096, 11008)) == "exact"
    assert choose_method(16, (32, 64)) == "exact"  # a quarter of the small side at most


# ---------------------------------------------------------------------------------------------- ranks


def spectrum(values: list[float]) -> Spectrum:
    squares = torch.tensor(values, dtype=torch.float64) ** 2
    return Spectrum([squares], float(squares.sum()), complete=True)


def test_energy_policy_returns_the_expected_rank():
    s = spectrum([4, 2, 1, 1])  # squares 16, 4, 1, 1 of 22
    policies = {1: Energy(16 / 22), 2: Energy(0.95), 3: Energy(1.0)}  # 0.95 * 22 = 20.9 needs 16 + 4 + 1
    res = resolve_ranks(policies, {1: s, 2: s, 3: s}, 4, hidden=40, intermediate=60, layers=1)
    assert res.ranks[1:] == [1, 3, 4]


def test_budget_allocation_is_exact():
    spectra = {1: spectrum([5, 4, 1, 0.5, 0.1]), 2: spectrum([3, 3, 3, 1, 1]), 3: spectrum([9, 0.2, 0.1, 0.1, 0.1])}
    for units in range(3, 13):
        got = allocate_budget(spectra, units, cap=100)
        best = max(
            (r for r in itertools.product(range(1, 6), repeat=3) if sum(r) <= units),
            key=lambda r: sum(spectra[e + 1].retained(r[e]) for e in range(3)),
        )
        value = lambda ranks: sum(spectra[e].retained(r) for e, r in ranks.items())  # noqa: E731
        assert value(got) == pytest.approx(value({1: best[0], 2: best[1], 3: best[2]}), abs=1e-12)
        assert sum(got.values()) <= units


def test_caps_and_break_even():
    res = resolve_ranks({1: Fixed(100), 2: Fixed(21), 3: Fixed(22)}, {}, 4, hidden=32, intermediate=64, layers=2)
    assert break_even_rank(32, 64) == 22
    assert res.ranks == [0, 0, 21, 0]
    assert "capped" in res.notes[1] and "break-even" in res.notes[3] and 2 not in res.notes


def test_budget_strings():
    assert parse_budget("10.75B") == 10_750_000_000 and parse_budget("500M") == 500_000_000
    assert parse_budget("3e9") == 3_000_000_000
    with pytest.raises(FlexmoreError, match="--budget"):
        parse_budget("lots")


# ------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def named_dir(tmp_path_factory, flexolmo_dir):
    return convert_checkpoint(flexolmo_dir, tmp_path_factory.mktemp("named") / "fo", to="flexolmo",
                              expert_names=NAMES).out


@pytest.fixture(scope="module")
def low_rank_dir(tmp_path_factory, flexolmo_config, tokenizer):
    """A FlexOlmo whose domain experts differ from the public one by deltas of rank exactly 3."""
    model = build_flexolmo(flexolmo_config, seed=5)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for p in (ex.gate_up_proj, ex.down_proj):
                for e in range(1, p.shape[0]):
                    out, inp = p.shape[1:]
                    delta = torch.randn(out, 3, generator=g) @ torch.randn(3, inp, generator=g) * 0.01
                    p[e] = p[0] + delta if p is ex.down_proj else p[0] + torch.cat(
                        [delta[: out // 2], delta[out // 2 :] * 2])
    path = tmp_path_factory.mktemp("lowrank") / "fo"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def logits(path_or_model, ids):
    model = load_model(path_or_model) if not isinstance(path_or_model, torch.nn.Module) else path_or_model
    with torch.no_grad():
        return model(ids).logits


def test_rank_at_the_true_delta_rank_reproduces_the_source(low_rank_dir, tmp_path, input_ids):
    # gate/up deltas are rank 3 each when split per projection (the fused HF tensor stacks them)
    out = extract(low_rank_dir, tmp_path / "r3", ranks="3").outputs[0]
    assert load_model(out).config.expert_ranks == [0, 3, 3, 3]
    assert_close(logits(out, input_ids), logits(low_rank_dir, input_ids), rtol=1e-4, atol=1e-5)
    out2 = extract(low_rank_dir, tmp_path / "r2", ranks="2").outputs[0]
    assert (logits(out2, input_ids) - logits(low_rank_dir, input_ids)).abs().max() > 1e-4
    report = json.loads((out / "extraction_report.json").read_text())
    assert all(x["relative_error"] < 1e-3 for x in report["experts"])


def test_full_keeps_the_source_and_rank_r_equals_its_dense_reconstruction(named_dir, tmp_path, input_ids):
    full = extract(named_dir, tmp_path / "full", ranks="full").outputs[0]
    assert_close(logits(full, input_ids), logits(named_dir, input_ids), rtol=0, atol=0)
    r = extract(named_dir, tmp_path / "r4", ranks="code=4,chat=8,math=full",
                settings=SvdSettings(rank=1, method="exact")).outputs[0]
    model = load_model(r)
    assert model.config.expert_ranks == [0, 4, 8, 0] and model.config.expert_names == NAMES
    dense = convert_checkpoint(r, tmp_path / "dense", to="flexolmo").out
    ref = FlexOlmoForCausalLM.from_pretrained(dense).eval()
    assert_close(logits(model, input_ids), logits(ref, input_ids), rtol=1e-5, atol=1e-5)
    # the factors are the truncated SVD of the delta, split symmetrically
    src, got = CheckpointReader(named_dir), CheckpointReader(r)
    key = "model.layers.1.mlp.experts.{e}.up_proj{p}.weight"
    d = src.get(key.format(e=1, p="")) - src.get(key.format(e=0, p=""))
    b, a = got.get(key.format(e=1, p="_b")), got.get(key.format(e=1, p="_a"))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    assert_close(b @ a, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-6)
    assert (r / "tokenizer.json").is_file() and (r / "extraction_report.json").is_file()
    assert not (tmp_path / "r4.svd-cache").exists()  # the default cache goes once the checkpoint is written


def test_energy_and_budget_policies_end_to_end(named_dir, tmp_path):
    rep = extract(named_dir, tmp_path / "e", ranks="energy:0.5").report
    for x in rep["experts"]:
        assert x["retained_energy"] >= 0.5
    out = extract(named_dir, tmp_path / "b", budget="60K", ranks="math=full")
    rep = out.report
    assert rep["parameters"] <= 60_000 and rep["expert_ranks"][3] == 0
    assert rep["expert_ranks"][1] > 0 and rep["expert_ranks"][2] > 0


def test_report_totals_and_errors(named_dir, tmp_path):
    rep = extract(named_dir, tmp_path / "r", ranks="code=2,chat=40").report
    code, chat, math = rep["experts"]
    assert code["rank"] == 2 and len(code["matrices"]) == 2 * 3
    assert all(abs(m["retained_energy"] + m["relative_error"] ** 2 - 1) < 1e-9 for m in code["matrices"])
    assert chat["rank"] == "full" and "capped" in chat["note"] and "break-even" in chat["note"]
    assert math["rank"] == "full" and math["requested"] == "full"
    assert rep["parameters"] < rep["parameters_all_full"] and rep["bytes"] == 4 * rep["parameters"]


def test_sweep_cache_then_assemble_without_another_svd(named_dir, tmp_path, monkeypatch):
    res = extract(named_dir, tmp_path / "sw", sweep="1,4,full")
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["rank-1", "rank-4", "rank-full", "svd-cache"]
    assert res.timings["matrices"] == 3 * 2 * 3  # every matrix factorised exactly once
    direct = extract(named_dir, tmp_path / "direct4", ranks="4").outputs[0]
    a, b = load_file(direct / "model.safetensors"), load_file(tmp_path / "sw" / "rank-4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def no_svd(*args, **kwargs):
        raise AssertionError("assembling from the cache must not run an SVD")

    monkeypatch.setattr("flexmore.extract.pipeline.truncated_svd", no_svd)
    rep = assemble_from_cache(tmp_path / "sw" / "svd-cache", tmp_path / "mixed", ranks="code=1,chat=4,math=full")
    assert rep["expert_ranks"] == [0, 1, 4, 0]
    assert load_model(tmp_path / "mixed").config.expert_ranks == [0, 1, 4, 0]
    with pytest.raises(FlexmoreError, match="exceeds the 4 singular vectors kept"):
        assemble_from_cache(tmp_path / "sw" / "svd-cache", tmp_path / "x", ranks="code=8")


def test_interrupted_extraction_resumes_from_the_cache(named_dir, tmp_path):
    reader, config = CheckpointReader(named_dir), load_model(named_dir).config
    cache_dir = tmp_path / "cache"
    settings = SvdSettings(rank=4)
    seen = []

    def crash_after_seven(name):
        seen.append(name)
        if len(seen) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_svd_cache(reader, config, cache_dir, settings, on_matrix=crash_after_seven)
    assert len(list(cache_dir.glob("*.safetensors"))) == 2  # two (expert, layer) files finished, none half
    assert not list(cache_dir.glob("*.tmp"))
    cache, timings = build_svd_cache(reader, config, cache_dir, settings)
    assert timings["reused"] == 6 and timings["matrices"] == 3 * 2 * 3 - 6
    # an interrupted extract leaves no OUT, and the rerun with the same cache gives the same checkpoint
    out = extract(named_dir, tmp_path / "out", ranks="4", cache_dir=cache_dir)
    assert out.timings["matrices"] == 0 and out.cache == cache_dir
    fresh = extract(named_dir, tmp_path / "fresh", ranks="4").outputs[0]
    a, b = load_file(fresh / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_notices_changed_source_and_other_settings(named_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(named_dir, src)
    cache_dir = tmp_path / "cache"
    extract(src, tmp_path / "a", ranks="4", cache_dir=cache_dir)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.experts.2.gate_proj.weight"] += 0.01
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    again = extract(src, tmp_path / "b", ranks="4", cache_dir=cache_dir)
    assert again.timings["matrices"] == 3 and again.timings["reused"] == 15  # only (chat, layer 0) redone
    with pytest.raises(FlexmoreError, match="other settings"):
        extract(src, tmp_path / "c", ranks="8", cache_dir=cache_dir)


def test_bf16_source(named_dir, tmp_path, input_ids):
    bf16 = convert_checkpoint(named_dir, tmp_path / "bf16", dtype="bfloat16").out
    out = extract(bf16, tmp_path / "out", ranks="4").outputs[0]
    reader = CheckpointReader(out)
    assert reader.dtype("model.layers.0.mlp.experts.1.gate_proj_a.weight") == "BF16"
    assert extract(bf16, tmp_path / "e64", ranks="4", settings=SvdSettings(rank=4, compute_dtype="float64")).report


# ------------------------------------------------------------------------------------------ bad input


def test_bad_input(named_dir, tmp_path):
    cases = [
        (dict(src=tmp_path / "nope", ranks="4"), "no such directory"),
        (dict(ranks="nosuch=4"), "unknown expert 'nosuch'"),
        (dict(ranks="code=0"), "rank 0 must be at least 1"),
        (dict(ranks="code=-2"), "rank -2 must be at least 1"),
        (dict(ranks="energy:1.5"), "energy 1.5 must be in (0, 1]"),
        (dict(ranks="energy:0"), "energy 0 must be in (0, 1]"),
        (dict(ranks="code=lots"), "'lots' is not a rank"),
        (dict(), "give --ranks, --budget or --sweep"),
        (dict(sweep="1,energy:0.5"), "a sweep lists ranks"),
        (dict(budget="1K"), "too small"),
    ]
    for kwargs, fragment in cases:
        src = kwargs.pop("src", named_dir)
        with pytest.raises(FlexmoreError) as err:
            extract(src, tmp_path / "out", **kwargs)
        assert fragment in str(err.value), (kwargs, str(err.value))
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    with pytest.raises(FlexmoreError, match="already exists"):
        extract(named_dir, tmp_path / "out", ranks="4")


def test_non_flexolmo_and_non_finite_sources(named_dir, tmp_path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FlexmoreError, match="not a FlexOlmo or FlexMoRE checkpoint"):
        extract(llama, tmp_path / "o", ranks="4")
    bad = tmp_path / "nan"
    shutil.copytree(named_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.experts.3.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FlexmoreError, match=r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight contains NaN or Inf"):
        extract(bad, tmp_path / "o", ranks="4")
    assert not (tmp_path / "o").exists()


def test_cli_extract_errors_are_one_line(named_dir, tmp_path, flexmore):
    for args, fragment in [
        (["--ranks", "code=0"], "--ranks code: rank 0 must be at least 1"),
        (["--ranks", "energy:2"], "energy 2 must be in (0, 1]"),
        (["--ranks", "bogus=4"], "unknown expert 'bogus'"),
        (["--compute-dtype", "float16", "--ranks", "4"], "--compute-dtype"),
    ]:
        result = flexmore("extract", named_dir, tmp_path / "o", *args)
        assert_one_error_line(result, fragment)
        assert not (tmp_path / "o").exists() and not leftovers(tmp_path / "o")
    ok = flexmore("extract", named_dir, tmp_path / "o", "--ranks", "code=2,chat=energy:0.6")
    assert ok.code == 0 and "retained energy" in ok.out and "saving" in ok.out
    again = flexmore("extract", named_dir, tmp_path / "o", "--ranks", "4")
    assert_one_error_line(again, "already exists")
