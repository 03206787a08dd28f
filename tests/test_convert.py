"""Streaming conversions: FlexOlmo <-> FlexMoRE, shards, hub ids, provenance."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import FlexOlmoForCausalLM

from flexmore import FlexmoreError
from flexmore.checkpoint import INDEX_NAME, META_NAME, CheckpointReader, CheckpointWriter
from flexmore.convert import convert_checkpoint, describe_checkpoint, load_model

from .conftest import NAMES


def all_tensors(path):
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader.keys()}


def test_flexolmo_to_flexmore_and_back_is_bit_identical(flexolmo_dir, tmp_path):
    mid = convert_checkpoint(flexolmo_dir, tmp_path / "fm", to="flexmore", expert_names=NAMES)
    assert json.loads((mid.out / "config.json").read_text())["model_type"] == "flexmore"
    back = convert_checkpoint(mid.out, tmp_path / "fo", to="flexolmo")
    cfg = json.loads((back.out / "config.json").read_text())
    assert cfg["model_type"] == "flex_olmo" and cfg["architectures"] == ["FlexOlmoForCausalLM"]
    assert "expert_ranks" not in cfg
    src, out = all_tensors(flexolmo_dir), all_tensors(back.out)
    assert src.keys() == out.keys()
    assert all(torch.equal(src[k], out[k]) for k in src)
    # names survive the FlexOlmo export through flexmore.json
    assert CheckpointReader(back.out) and load_model(back.out).config.expert_names == NAMES


def test_tokenizer_and_generation_files_travel(flexolmo_dir, tmp_path):
    out = convert_checkpoint(flexolmo_dir, tmp_path / "fm").out
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (flexolmo_dir / name).read_bytes()
    meta = json.loads((out / META_NAME).read_text())
    assert meta["flexmore_version"] and meta["operation"] == "convert --to flexmore"


def test_sharded_output_and_sharded_input(flexolmo_dir, tmp_path, input_ids):
    sharded = convert_checkpoint(flexolmo_dir, tmp_path / "sharded", max_shard_bytes=40_000).out
    index = json.loads((sharded / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert not (sharded / "model.safetensors").exists()
    # every shard holds what the index says, and HF loads the sharded FlexMoRE checkpoint
    for shard in shards:
        assert set(load_file(sharded / shard)) == {k for k, v in index["weight_map"].items() if v == shard}
    # sharded input -> dense FlexOlmo that stock transformers loads, same logits as the source
    dense = convert_checkpoint(sharded, tmp_path / "dense", to="flexolmo").out
    ref = FlexOlmoForCausalLM.from_pretrained(flexolmo_dir).eval()
    got = FlexOlmoForCausalLM.from_pretrained(dense).eval()
    with torch.no_grad():
        assert torch.equal(ref(input_ids).logits, got(input_ids).logits)


def test_hub_id_resolves_through_the_hf_cache(flexolmo_dir, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's real snapshot resolution (offline, from a local cache)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-flexolmo" / "snapshots" / ("0" * 40)
    shutil.copytree(flexolmo_dir, snapshot)
    (cache / "models--acme--tiny-flexolmo" / "refs").mkdir()
    (cache / "models--acme--tiny-flexolmo" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    out = convert_checkpoint("acme/tiny-flexolmo", tmp_path / "from-hub").out
    assert describe_checkpoint(out)["parameters"] == describe_checkpoint(flexolmo_dir)["parameters"]
    with pytest.raises(FlexmoreError, match="acme/absent: not a local directory and not fetchable"):
        convert_checkpoint("acme/absent", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_dtype_option_casts_weights(flexolmo_dir, tmp_path):
    out = convert_checkpoint(flexolmo_dir, tmp_path / "bf16", dtype="bfloat16").out
    reader = CheckpointReader(out)
    assert {reader.dtype(k) for k in reader.keys()} == {"BF16"}
    assert describe_checkpoint(out)["bytes"] == 2 * describe_checkpoint(out)["parameters"]
    with pytest.raises(FlexmoreError, match="--dtype: unknown dtype 'int3'"):
        convert_checkpoint(flexolmo_dir, tmp_path / "bad", dtype="int3")


def test_writer_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out) as writer:
            writer.add("a", torch.zeros(3))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_on_success(flexolmo_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FlexmoreError, match="already exists"):
        convert_checkpoint(flexolmo_dir, out)
    with pytest.raises(FlexmoreError, match="unknown expert"):
        convert_checkpoint(flexolmo_dir, out, drop_experts=["nosuch"], overwrite=True)
    assert (out / "keep.txt").read_text() == "old"
    convert_checkpoint(flexolmo_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_writer_streams_each_tensor_to_disk_and_round_trips_every_dtype(tmp_path):
    tensors = {
        "a.f32": torch.randn(7, 5),
        "b.bf16": torch.randn(3, 4).to(torch.bfloat16),
        "c.f16": torch.randn(9).to(torch.float16),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.f64": torch.randn(2, 2, dtype=torch.float64),
    }
    with CheckpointWriter(tmp_path / "out", max_shard_bytes=100) as writer:
        on_disk = []
        for name, t in tensors.items():
            writer.add(name, t)
            on_disk.append(sum(p.stat().st_size for p in writer.tmp.glob("*")))
        writer.commit({"operation": "test"})
    assert on_disk == sorted(on_disk) and on_disk[-1] > 0  # bytes reach disk as tensors arrive
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    back = {}
    for shard in sorted(set(index["weight_map"].values())):
        back.update(load_file(tmp_path / "out" / shard))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
