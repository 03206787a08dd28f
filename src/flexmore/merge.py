"""Merge: the owners' 2-expert checkpoints -> one (n+1)-expert mixture (FlexOlmo recipe, REFERENCE §6).

Each owner trained expert 1 and router row 1 of a 2-expert MoE [public, domain] on their own data with
everything else frozen. Merging puts the domain experts behind the one public expert:
    router, per layer   [public row 0; owner_1 row 1; ...; owner_n row 1]          [n+1, H]
    expert i (1..n)     owner_i's expert 1: full weights, or low-rank factors kept as factors
    everything else     embeddings, attention, norms, lm_head and expert 0, copied once
All full-size -> a FlexOlmo checkpoint (stock transformers loads it); any low-rank -> FlexMoRE.

This is only sound when every owner started from the same public model and kept it frozen, so every
shared tensor, every expert 0 and every router row 0 must be bit-identical across the inputs. The
check runs in the same streaming pass as the writing, one tensor per input at a time: the output goes
to a temporary directory that an error discards, so a failed merge leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointReader, CheckpointWriter
from .config import FULL, PUBLIC, FlexMoREConfig, default_expert_names
from .convert import _EXPERT_KEY, _ROUTER_KEY, expected_shapes, expert_key, flexolmo_config, open_checkpoint
from .errors import FlexmoreError

# Config fields every input must share: they fix tensor shapes or what the shared weights compute.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "tie_word_embeddings",
)
_GENERIC_DOMAIN_NAME = default_expert_names(2)[1]  # "expert1": what an unnamed 2-expert checkpoint calls it
_NOT_SAME_PUBLIC = "the owners were not trained from the same public model"


@dataclass
class MergeInput:
    source: str  # as the user gave it (directory or hub id)
    reader: CheckpointReader
    config: FlexMoREConfig


@dataclass
class MergeResult:
    out: Path
    config: FlexMoREConfig  # the merged mixture (a FlexMoRE view even when a FlexOlmo checkpoint was written)
    target: str  # "flexolmo" (every expert full-size) | "flexmore" (some expert low-rank)
    public: str | None  # the public model input, when one was given first
    owners: list[str] = field(default_factory=list)

    @property
    def expert_names(self) -> list[str]:
        return self.config.expert_names


def merge_experts(
    out: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    names: Sequence[str] | None = None,
    overwrite: bool = False,
    top_k: int | None = None,
    max_shard_bytes: int = 4 << 30,
    on_tensor: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge owners' 2-expert checkpoints (expert 0 public, expert 1 theirs) into one mixture at `out`.

    `inputs`: the owners' checkpoints, optionally preceded by the public model (a 1-expert checkpoint).
    `names`: one expert name per owner (default: the owner's own name for expert 1, else its directory).
    `top_k`: active experts per token (default: the owners' value, clamped to the number of experts).
    Refuses, before anything reaches `out`, inputs that do not share one architecture and one public model.
    """
    if not inputs:
        raise FlexmoreError("merge: no inputs; give the owners' checkpoints (optionally the public model first)")
    opened = [MergeInput(str(src), *open_checkpoint(src)) for src in inputs]
    public = opened[0] if opened[0].config.num_experts == 1 else None
    owners = opened[1:] if public is not None else opened
    _check_expert_counts(opened)
    if not owners:
        raise FlexmoreError(f"merge: {public.source} is the public model; give at least one owner's checkpoint too")
    _check_architecture(opened)
    out = Path(out)
    for x in opened:
        if out.resolve() == x.reader.path.resolve():
            raise FlexmoreError(f"{out}: is also an input; write the merged model somewhere else")

    owner_names = _owner_names(owners, names)
    n = len(owners)
    if top_k is not None and not 1 <= top_k <= n + 1:
        raise FlexmoreError(f"--top-k {top_k}: must be between 1 and the number of experts ({n + 1})")
    k = min(owners[0].config.num_experts_per_tok, n + 1) if top_k is None else top_k
    ranks = [FULL] + [x.config.expert_ranks[1] for x in owners]
    base = owners[0].config.to_dict()
    base.update(num_experts=n + 1, num_experts_per_tok=k)
    target = FlexMoREConfig.from_flexolmo(base, expert_ranks=ranks, expert_names=["public", *owner_names])
    all_full = all(rank == FULL for rank in ranks)

    first, others = opened[0], opened[1:]

    def read(x: MergeInput, name: str) -> torch.Tensor:
        tensor = x.reader.get(name)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FlexmoreError(f"{x.reader.file_of(name)}: tensor {name} contains NaN or Inf values")
        return tensor

    def check_same(name: str, what: str, a: torch.Tensor, b: torch.Tensor, x: MergeInput) -> None:
        if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b):
            return
        detail = f" ({a.dtype} vs {b.dtype})".replace("torch.", "") if a.dtype != b.dtype else ""
        raise FlexmoreError(
            f"{what} differs between {first.reader.file_of(name)} and {x.reader.file_of(name)}{detail}: "
            f"{_NOT_SAME_PUBLIC}"
        )

    def shared(name: str) -> torch.Tensor:
        """A tensor every input holds identically (shared weights, expert 0): read from each, kept once."""
        tensor = read(first, name)
        for x in others:
            check_same(name, name, tensor, read(x, name), x)
        return tensor

    def router(name: str) -> torch.Tensor:
        """[public row 0; each owner's row 1]: [n+1, H]; row 0 must agree across the owners.

        A 1-expert public model's router row has no effect on its output (softmax over one expert), so
        it is not compared: row 0 comes from the owners, who all trained with it frozen.
        """
        first_owner = owners[0]
        first_weight = read(first_owner, name)  # [2, H]
        row0 = first_weight[PUBLIC : PUBLIC + 1]  # [1, H]
        rows = [row0]
        for x in owners:
            weight = first_weight if x is first_owner else read(x, name)
            if x is not first_owner:
                check_same(name, f"{name} row 0 (the public router row)", row0, weight[PUBLIC : PUBLIC + 1], x)
            rows.append(weight[1:2])  # the owner's row: [1, H]
        return torch.cat(rows)

    def produce(name: str) -> torch.Tensor:
        if _ROUTER_KEY.match(name):
            return router(name)
        if m := _EXPERT_KEY.match(name):
            layer, slot, proj, part = int(m[1]), int(m[2]), m[3], m[4] or ""
            if slot == PUBLIC:
                return shared(name)
            return read(owners[slot - 1], expert_key(layer, 1, proj, part))
        return shared(name)

    saved_config = flexolmo_config(target) if all_full else target
    with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name in expected_shapes(target):
            writer.add(name, produce(name))
            if on_tensor is not None:
                on_tensor(name)
        saved_config.save_pretrained(writer.tmp)
        for file in first.reader.extra_files():
            writer.copy_file(file)
        writer.commit(
            {
                "operation": "merge",
                "public": public.source if public is not None else None,
                "owners": [x.source for x in owners],
                "inputs": [x.source for x in opened],
                "expert_names": target.expert_names,  # read back by read_config for a FlexOlmo output
                "expert_ranks": target.expert_ranks,
                "num_experts_per_tok": target.num_experts_per_tok,
            }
        )
    return MergeResult(
        out=out,
        config=target,
        target="flexolmo" if all_full else "flexmore",
        public=public.source if public is not None else None,
        owners=[x.source for x in owners],
    )


def _check_expert_counts(opened: list[MergeInput]) -> None:
    for i, x in enumerate(opened):
        e = x.config.num_experts
        if i == 0 and e not in (1, 2):
            raise FlexmoreError(
                f"{x.source}: has {e} experts; the first input is the public model (1 expert) or an owner's "
                "checkpoint (2 experts: public, domain)"
            )
        if i > 0 and e != 2:
            what = "the public model goes first" if e == 1 else "an owner's checkpoint has 2 (public, domain)"
            raise FlexmoreError(f"{x.source}: has {e} expert{'s' if e != 1 else ''}; {what}")


def _check_architecture(opened: list[MergeInput]) -> None:
    first = opened[0]
    for x in opened[1:]:
        for key in ARCHITECTURE_FIELDS:
            a, b = getattr(first.config, key, None), getattr(x.config, key, None)
            if a != b:
                raise FlexmoreError(
                    f"{x.source}: {key} is {b} but {first.source} has {a}; every input must have the public model's "
                    "architecture"
                )


def _owner_names(owners: list[MergeInput], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = [str(name).strip() for name in names]
        if len(names) != len(owners):
            raise FlexmoreError(f"--names: {len(names)} names given but there are {len(owners)} owners")
        if not all(names):
            raise FlexmoreError(f"--names: empty name in {','.join(names)}")
        if "public" in names:
            raise FlexmoreError("--names: 'public' is the name of expert 0 (the public expert); choose another")
        if len(set(names)) != len(names):
            raise FlexmoreError(f"--names: names must be unique, got {','.join(names)}")
        return names
    out: list[str] = []
    for x in owners:
        name = x.config.expert_names[1]
        if name == _GENERIC_DOMAIN_NAME:
            path = Path(x.source)
            name = path.resolve().name if path.exists() else path.name
        if name == "public" or name in out:
            other = owners[out.index(name)].source if name in out else "the public expert"
            raise FlexmoreError(
                f"{x.source}: its expert would be named {name!r}, as is {other}; name the owners' experts with --names"
            )
        out.append(name)
    return out
