"""FlexMoREForCausalLM: HF FlexOlmo attention, norms and rotary embedding + rank-heterogeneous experts.

Layer l (OLMo-2 style, norms after each sub-block):
    h = h + RMSNorm_post_attn(Attn(h))
    h = h + RMSNorm_post_ff(MoE(h))          MoE = FlexMoRESparseMoeBlock (experts.py)
Only the MoE differs from FlexOlmo; everything else is the transformers implementation, so the
parity tests against `FlexOlmoForCausalLM` check our experts and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.flex_olmo import modeling_flex_olmo as hf
from transformers.utils.output_capturing import OutputRecorder

from .config import PUBLIC, FlexMoREConfig, resolve_expert
from .errors import FlexmoreError
from .experts import FlexMoRESparseMoeBlock


class FlexMoREDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: FlexMoREConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = hf.FlexOlmoAttention(config=config, layer_idx=layer_idx)
        self.mlp = FlexMoRESparseMoeBlock(config)
        self.post_attention_layernorm = hf.FlexOlmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = hf.FlexOlmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    forward = hf.FlexOlmoDecoderLayer.forward  # identical residual/norm wiring


class FlexMoREPreTrainedModel(PreTrainedModel):
    config_class = FlexMoREConfig
    config: FlexMoREConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FlexMoREDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(hf.FlexOlmoTopKRouter, index=0),
        "hidden_states": FlexMoREDecoderLayer,
        "attentions": hf.FlexOlmoAttention,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, hf.FlexOlmoTopKRouter):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class FlexMoREModel(FlexMoREPreTrainedModel):
    def __init__(self, config: FlexMoREConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(FlexMoREDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = hf.FlexOlmoRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = hf.FlexOlmoRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    forward = hf.FlexOlmoModel.forward


class FlexMoREForCausalLM(FlexMoREPreTrainedModel, GenerationMixin):
    """A FlexOlmo-compatible causal LM whose domain experts may be low-rank corrections of the public one."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FlexMoREConfig):
        super().__init__(config)
        self.model = FlexMoREModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    forward = hf.FlexOlmoForCausalLM.forward

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HF's save_pretrained, plus `flexmore.json` recording the flexmore version that wrote it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        from .checkpoint import write_meta

        write_meta(Path(save_directory), {"operation": "save_pretrained", "expert_names": self.config.expert_names,
                                          "expert_ranks": self.config.expert_ranks})

    def moe_blocks(self) -> list[FlexMoRESparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers]

    def set_top_k(self, top_k: int) -> None:
        """Number of active experts per token (FlexOlmo's `num_experts_per_tok`)."""
        if not 1 <= top_k <= self.config.num_experts:
            raise FlexmoreError(f"--top-k {top_k}: must be between 1 and the number of experts ({self.config.num_experts})")
        self.config.num_experts_per_tok = self.num_experts_per_tok = top_k
        for block in self.moe_blocks():
            block.gate.top_k = top_k

    def drop_experts(self, names: list[str] | tuple[str, ...]) -> None:
        """Opt-out (FlexOlmo's definition): remove each expert's FFN and router row in every layer.

        Active k is clamped to the number of experts left.
        """
        keep = experts_to_keep(self.config.expert_names, names)
        cfg = self.config
        top_k = min(cfg.num_experts_per_tok, len(keep))
        for block in self.moe_blocks():
            block.keep_experts(keep, top_k)
        cfg.expert_ranks = [cfg.expert_ranks[e] for e in keep]
        cfg.expert_names = [cfg.expert_names[e] for e in keep]
        cfg.num_experts = self.num_experts = len(keep)
        cfg.num_experts_per_tok = self.num_experts_per_tok = top_k


def experts_to_keep(expert_names: list[str], drop: list[str] | tuple[str, ...]) -> list[int]:
    """Indices of the experts left after opting out `drop` (names or indices); refuses the public expert."""
    dropped = set()
    for key in drop:
        e = resolve_expert(key, expert_names, "--drop-expert")
        if e == PUBLIC:
            raise FlexmoreError(f"--drop-expert {key}: the public expert cannot be opted out")
        dropped.add(e)
    return [e for e in range(len(expert_names)) if e not in dropped]


def dense_expert_weights(model: FlexMoREForCausalLM) -> dict[str, torch.Tensor]:
    """State dict of the dense FlexOlmo equivalent (every low-rank expert materialised)."""
    out = {}
    for key, value in model.state_dict().items():
        if ".mlp.experts." not in key:
            out[key] = value
    for layer_idx, block in enumerate(model.moe_blocks()):
        public = block.experts[0]
        for e, expert in enumerate(block.experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"model.layers.{layer_idx}.mlp.experts.{e}.{proj}.weight"] = expert.dense_weight(proj, public)
    return out


AutoConfig.register(FlexMoREConfig.model_type, FlexMoREConfig, exist_ok=True)
AutoModelForCausalLM.register(FlexMoREConfig, FlexMoREForCausalLM, exist_ok=True)
