"""A loaded FlexMoRE model holds its parameters and nothing more: no hidden dense copies of low-rank experts."""

from __future__ import annotations

import json
import subprocess
import sys


from flexmore.config import FlexMoREConfig
from flexmore.tiny import build_flexmore, tiny_flexolmo_config

# Runs in a fresh interpreter so the resident-set figures belong to this load alone.
_MEASURE = r"""
import gc, json, sys
import torch
import flexmore
from flexmore.convert import load_model

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

warm = load_model(sys.argv[2])  # a tiny checkpoint first: lazy imports and one-time set-up are not the model's
with torch.no_grad():
    warm(torch.randint(2, 500, (2, 64)))  # and the BLAS / thread-pool set-up of a first forward
del warm
gc.collect()
before = rss()
model = load_model(sys.argv[1])
with torch.no_grad():  # weights may still be mapped from the file: bring every page in
    for p in model.parameters():
        p.sum()
gc.collect()
after_load = rss()
with torch.no_grad():
    model(torch.randint(2, 500, (2, 64)))
gc.collect()
after_forward = rss()
tensors = {}
for t in list(model.parameters()) + list(model.buffers()):
    tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
print(json.dumps({"load": after_load - before, "forward": after_forward - before, "storages": sum(tensors.values()),
                  "parameters": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def test_loaded_model_memory_equals_parameter_bytes(tmp_path):
    cfg = tiny_flexolmo_config(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                               num_attention_heads=8, num_experts=7, num_experts_per_tok=4)
    ranks = [0, 8, 16, 32, 64, 128, 0]
    config = FlexMoREConfig.from_flexolmo(cfg, expert_ranks=ranks)
    build_flexmore(config).save_pretrained(tmp_path / "model")
    small = FlexMoREConfig.from_flexolmo(tiny_flexolmo_config(vocab_size=512), expert_ranks=[0, 2, 0, 4])
    build_flexmore(small).save_pretrained(tmp_path / "small")
    param_bytes = 4 * config.parameter_count().total
    dense_bytes = 4 * config.parameter_count().all_full_total
    assert dense_bytes > 1.5 * param_bytes  # a hidden dense copy would be plain to see

    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "model"), str(tmp_path / "small")], capture_output=True, text=True,
                         check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print("memory", m, "param bytes", param_bytes)
    assert m["parameters"] == param_bytes
    # tensors reachable from the model: parameters plus a few rotary buffers
    assert param_bytes <= m["storages"] <= 1.01 * param_bytes
    # what the process holds after loading, and after a forward pass (its workspace is released)
    assert 0.9 * param_bytes <= m["load"] <= 1.08 * param_bytes, m
    assert m["forward"] <= 1.08 * param_bytes + (8 << 20), m
