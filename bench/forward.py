"""Forward-pass benchmark: FlexMoRE's base-sharing MoE vs HF FlexOlmo, measured side by side.

Prints one JSON line per row, then a markdown table. Every row times its implementations in
interleaved repetitions (A B C A B C ...) within one run and reports medians, so machine noise hits
all of them alike; only ratios are meant to be compared.

  python bench/forward.py                 # the full table (a few minutes on 2 CPU cores)
  python bench/forward.py --smoke         # tiny dimensions, seconds: checks the script itself

Implementations:
  flexolmo     HF `FlexOlmoSparseMoeBlock` / `FlexOlmoForCausalLM` with full-size experts (the baseline)
  dense        the same HF code running FlexMoRE's experts materialised as W_public + B A (what the paper ran)
  flexmore     `FlexMoRESparseMoeBlock` / `FlexMoREForCausalLM` (one shared base per token + low-rank terms)

FLOP-ratio limit: multiply-accumulates of the baseline over those of FlexMoRE for the routing actually
taken (SwiGLU matmuls only, attention and router counted for whole models), so `fraction` says how much
of the arithmetic saving the implementation turns into speed. As in the setting of REFERENCE §5, the
router is biased so the public expert is active for every token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoSparseMoeBlock

from flexmore.config import FlexMoREConfig
from flexmore.experts import PROJECTIONS, FlexMoRESparseMoeBlock
from flexmore.modeling import FlexMoREForCausalLM


@dataclass
class Dims:
    hidden: int
    inter: int
    experts: int
    layers: int
    heads: int
    vocab: int
    tokens: tuple[int, ...]
    ks: tuple[int, ...]
    ranks: tuple[int, ...]
    model_rank: int
    prefill: int
    decode_steps: int
    reps: int


FULL = Dims(1024, 2816, 7, 8, 16, 32000, (1, 64, 512), (2, 4, 7), (8, 64, 256), 64, 512, 32, 7)
SMOKE = Dims(64, 96, 4, 2, 4, 256, (1, 16), (2, 4), (4,), 4, 16, 4, 2)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per implementation, repetitions interleaved across implementations."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(s) for name, s in samples.items()}


def bias_router_to_public(gate_weight: torch.Tensor) -> None:
    """Feature 0 of every input is set to 1 (see `inputs`); a weight on it puts expert 0 in (nearly) every
    top-k while leaving the domain experts' router weights large enough to matter in the output."""
    gate_weight[:, 0] = 0.0
    gate_weight[0, 0] = 3.0


def inputs(batch: int, tokens: int, hidden: int) -> torch.Tensor:
    x = torch.randn(batch, tokens, hidden)
    x[..., 0] = 1.0
    return x


@torch.no_grad()
def init_flexmore_experts(block: FlexMoRESparseMoeBlock, std: float = 0.02) -> None:
    for expert in block.experts:
        for p in expert.parameters():
            p.normal_(0, std if expert.rank == 0 else (0.5 * std / expert.rank**0.5) ** 0.5)


@torch.no_grad()
def load_dense(ref_experts, block: FlexMoRESparseMoeBlock) -> None:
    """Write each FlexMoRE expert, materialised, into HF's fused expert tensors."""
    public = block.experts[0]
    for e, expert in enumerate(block.experts):
        gate, up, down = (expert.dense_weight(p, public) for p in PROJECTIONS)
        ref_experts.gate_up_proj[e] = torch.cat([gate, up], 0)
        ref_experts.down_proj[e] = down


def moe_macs(routing: torch.Tensor, ranks: list[int], hidden: int, inter: int) -> tuple[int, int]:
    """(baseline, flexmore) SwiGLU multiply-accumulates for a routing [N, k] of expert indices."""
    full = 3 * hidden * inter
    per_expert = [int((routing == e).sum()) for e in range(len(ranks))]
    baseline = sum(per_expert) * full
    flexmore = routing.shape[0] * full  # the public base, once per token (covers the public expert itself)
    for e in range(1, len(ranks)):
        flexmore += per_expert[e] * (full if ranks[e] == 0 else 3 * ranks[e] * (hidden + inter))
    return baseline, flexmore


def hf_config(d: Dims, k: int, **kw) -> FlexOlmoConfig:
    return FlexOlmoConfig(
        hidden_size=d.hidden, intermediate_size=d.inter, num_experts=d.experts, num_experts_per_tok=k,
        num_hidden_layers=d.layers, num_attention_heads=d.heads, vocab_size=d.vocab,
        pad_token_id=0, eos_token_id=1, max_position_embeddings=4096, **kw,
    )


def bench_moe_blocks(d: Dims):
    for rank in d.ranks:
        for k in d.ks:
            torch.manual_seed(0)
            cfg = hf_config(d, k)
            ranks = [0] + [rank] * (d.experts - 1)
            ours = FlexMoRESparseMoeBlock(FlexMoREConfig.from_flexolmo(cfg, expert_ranks=ranks)).eval()
            init_flexmore_experts(ours)
            with torch.no_grad():
                ours.gate.weight.normal_(0, 0.02)
                bias_router_to_public(ours.gate.weight)
            baseline = FlexOlmoSparseMoeBlock(cfg).eval()  # independent full-size experts
            dense = FlexOlmoSparseMoeBlock(cfg).eval()
            with torch.no_grad():
                for block in (baseline, dense):
                    block.gate.weight.copy_(ours.gate.weight)
                baseline.experts.gate_up_proj.normal_(0, 0.02)
                baseline.experts.down_proj.normal_(0, 0.02)
            load_dense(dense.experts, ours)
            for tokens in d.tokens:
                x = inputs(1, tokens, d.hidden)
                with torch.no_grad():
                    _, _, routing = ours.gate(x.reshape(-1, d.hidden))
                    expected = dense(x)
                    err = ((ours(x) - expected).abs().max() / expected.abs().max()).item()
                    t = interleaved(
                        {"flexolmo": lambda: baseline(x), "dense": lambda: dense(x), "flexmore": lambda: ours(x)},
                        reps=d.reps if tokens > 1 else 5 * d.reps,
                    )
                base_macs, our_macs = moe_macs(routing, ranks, d.hidden, d.inter)
                yield row("moe_block", dict(T=tokens, k=k, rank=rank), t, base_macs / our_macs, max_rel_diff=err,
                          public_share=round(float((routing == 0).any(-1).float().mean()), 3))


def row(kind: str, key: dict, t: dict, limit: float, **extra) -> dict:
    speedup = t["flexolmo"] / t["flexmore"]
    out = {"bench": kind, **key}
    out.update({f"{name}_ms": round(1000 * s, 3) for name, s in t.items()})
    out.update(
        speedup_vs_flexolmo=round(speedup, 3),
        speedup_vs_dense=round(t["dense"] / t["flexmore"], 3) if "dense" in t else None,
        flop_limit=round(limit, 3),
        fraction_of_limit=round(speedup / limit, 3),
        **extra,
    )
    return out


def build_models(d: Dims, k: int):
    """FlexMoRE (public full + low-rank experts) and its dense FlexOlmo export: same weights, same function."""
    torch.manual_seed(0)
    cfg = hf_config(d, k)
    ranks = [0] + [d.model_rank] * (d.experts - 1)
    ours = FlexMoREForCausalLM(FlexMoREConfig.from_flexolmo(cfg, expert_ranks=ranks)).eval()
    for block in ours.moe_blocks():
        init_flexmore_experts(block)
        with torch.no_grad():
            bias_router_to_public(block.gate.weight)
    ref = FlexOlmoForCausalLM(cfg).eval()
    shared = {k: v for k, v in ours.state_dict().items() if ".mlp.experts." not in k}
    missing = ref.load_state_dict(shared, strict=False).missing_keys
    assert all(".mlp.experts." in m for m in missing), missing
    for layer, block in zip(ref.model.layers, ours.moe_blocks()):
        load_dense(layer.mlp.experts, block)
    return ours, ref, ranks


def model_macs(d: Dims, k: int, ranks: list[int], tokens: int, context: int) -> tuple[int, int]:
    """Whole-model MACs for `tokens` new tokens attending to `context` positions on average."""
    h = d.hidden
    attn = tokens * (4 * h * h + 2 * context * h + d.experts * h)
    routing = torch.tensor([[0] + list(range(1, k))] * tokens)  # public + k-1 domain experts (biased router)
    base, ours = moe_macs(routing, ranks, h, d.inter)
    head = h * d.vocab  # logits for the last position only
    return d.layers * (attn + base) + head, d.layers * (attn + ours) + head


def bench_models(d: Dims):
    for k in d.ks:
        ours, ref, ranks = build_models(d, k)
        models = {"flexolmo": ref, "flexmore": ours}
        prompt = torch.randint(2, d.vocab, (1, d.prefill))
        with torch.no_grad():
            expected = ref(prompt[:, :32]).logits
            diff = ((ours(prompt[:, :32]).logits - expected).abs().max() / expected.abs().max()).item()
            t = interleaved({n: (lambda m=m: m(prompt, logits_to_keep=1)) for n, m in models.items()}, reps=max(3, d.reps // 2))
        base, mine = model_macs(d, k, ranks, d.prefill, d.prefill // 2)
        r = row("prefill", dict(T=d.prefill, k=k, rank=d.model_rank), t, base / mine, max_rel_diff=diff)
        r["flexolmo_tok_s"] = round(d.prefill / t["flexolmo"], 1)
        r["flexmore_tok_s"] = round(d.prefill / t["flexmore"], 1)
        yield r

        short = prompt[:, :64]

        def decode(model):
            with torch.no_grad():
                out = model(short, use_cache=True, logits_to_keep=1)
                cache, token = out.cache, out.logits[:, -1:].argmax(-1)
                start = time.perf_counter()
                for _ in range(d.decode_steps):
                    out = model(token, cache=cache, use_cache=True)
                    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
                return time.perf_counter() - start

        samples = {n: [] for n in models}
        for n, m in models.items():
            decode(m)  # warm-up
        for _ in range(max(3, d.reps // 2)):
            for n, m in models.items():
                samples[n].append(decode(m) / d.decode_steps)
        t = {n: statistics.median(s) for n, s in samples.items()}
        base, mine = model_macs(d, k, ranks, 1, 64 + d.decode_steps // 2)
        r = row("decode", dict(T=1, k=k, rank=d.model_rank), t, base / mine)
        r["flexolmo_tok_s"] = round(1 / t["flexolmo"], 1)
        r["flexmore_tok_s"] = round(1 / t["flexmore"], 1)
        yield r
        del ours, ref


def markdown(rows: list[dict]) -> str:
    lines = [
        "| bench | T | k | rank | FlexOlmo ms | dense ms | FlexMoRE ms | speedup vs FlexOlmo | vs dense | FLOP limit | fraction |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        dense = f"{r['dense_ms']:.2f}" if "dense_ms" in r else "="
        vs_dense = f"{r['speedup_vs_dense']:.2f}x" if r.get("speedup_vs_dense") else "="
        lines.append(
            f"| {r['bench']} | {r['T']} | {r['k']} | {r['rank']} | {r['flexolmo_ms']:.2f} | {dense} | "
            f"{r['flexmore_ms']:.2f} | {r['speedup_vs_flexolmo']:.2f}x | {vs_dense} | {r['flop_limit']:.2f}x | "
            f"{100 * r['fraction_of_limit']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny dimensions: checks the script in seconds")
    parser.add_argument("--only", choices=["moe", "model"], help="run one part only")
    parser.add_argument("--reps", type=int, help="repetitions per implementation (median taken)")
    args = parser.parse_args(argv)
    d = SMOKE if args.smoke else FULL
    if args.reps:
        d.reps = args.reps
    print(json.dumps({"bench": "env", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "device": "cpu", "dims": d.__dict__}), flush=True)
    rows = []
    parts = [bench_moe_blocks, bench_models]
    if args.only == "moe":
        parts = [bench_moe_blocks]
    elif args.only == "model":
        parts = [bench_models]
    for part in parts:
        for r in part(d):
            rows.append(r)
            print(json.dumps(r), flush=True)
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
