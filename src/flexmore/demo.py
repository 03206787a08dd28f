"""The smallest end-to-end path, offline: tiny model -> convert -> save -> reload -> generate -> export.

(The full study on a tiny world arrives with the demo issue; this checks the model layer end to end.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, FlexOlmoForCausalLM

from .checkpoint import atomic_dir
from .config import FlexMoREConfig
from .convert import convert_checkpoint, describe_checkpoint
from .tiny import build_flexmore, build_flexolmo, build_tokenizer, stdlib_text, tiny_flexolmo_config


def run_demo(out: Path, seed: int = 0, log: Callable[[str], None] | None = print) -> dict:
    log = log or (lambda _msg: None)
    results = {}
    with atomic_dir(out, overwrite=True) as tmp:
        log("1. training a byte-level BPE tokenizer on Python's own stdlib sources")
        tokenizer = build_tokenizer(stdlib_text(), vocab_size=512)
        config = tiny_flexolmo_config(vocab_size=len(tokenizer), num_experts=4, num_experts_per_tok=2)

        log("2. building a tiny random FlexOlmo (public + 3 domain experts) and saving it")
        flexolmo = build_flexolmo(config, seed=seed)
        flexolmo.save_pretrained(tmp / "flexolmo")
        tokenizer.save_pretrained(tmp / "flexolmo")

        log("3. converting it to FlexMoRE (all experts full), then opting 'math' out with k=1")
        convert_checkpoint(tmp / "flexolmo", tmp / "flexmore-full", to="flexmore",
                           expert_names=["public", "code", "chat", "math"])
        convert_checkpoint(tmp / "flexmore-full", tmp / "flexmore-k1-no-math", to="flexmore",
                           top_k=1, drop_experts=["math"])

        log("4. building a rank-heterogeneous FlexMoRE (code rank 4, chat rank 16, math full) and saving it")
        mixed_config = FlexMoREConfig.from_flexolmo(
            config, expert_ranks=[0, 4, 16, 0], expert_names=["public", "code", "chat", "math"]
        )
        mixed = build_flexmore(mixed_config, seed=seed)
        mixed.save_pretrained(tmp / "flexmore-mixed")
        tokenizer.save_pretrained(tmp / "flexmore-mixed")
        info = describe_checkpoint(tmp / "flexmore-mixed")
        log(f"   {info['parameters']:,} parameters vs {info['parameters_all_full']:,} all-full "
            f"({100 * info['saving']:.1f}% saved)")

        log("5. reloading with AutoModelForCausalLM and generating")
        model = AutoModelForCausalLM.from_pretrained(tmp / "flexmore-mixed").eval()
        prompt = tokenizer("def main(", return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(generated[0])
        log(f"   generated (random weights, so gibberish): {text!r}")

        log("6. exporting to a dense FlexOlmo checkpoint and checking stock FlexOlmoForCausalLM agrees")
        convert_checkpoint(tmp / "flexmore-mixed", tmp / "flexolmo-dense", to="flexolmo")
        dense = FlexOlmoForCausalLM.from_pretrained(tmp / "flexolmo-dense").eval()
        ids = tokenizer("class Example:\n    pass", return_tensors="pt").input_ids
        with torch.no_grad():
            diff = (model(ids).logits - dense(ids).logits).abs().max().item()
        log(f"   max |logit difference| FlexMoRE vs its dense FlexOlmo export: {diff:.2e}")
        if diff > 1e-4:
            raise RuntimeError(f"dense export disagrees with the FlexMoRE model (max diff {diff})")
        results = {"generated": text, "max_logit_diff": diff, "parameters": info["parameters"]}
    log(f"done: checkpoints in {out}")
    return results
