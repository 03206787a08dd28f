"""Rank-heterogeneous experts and the MoE block that shares the public FFN.

Expert e computes SwiGLU  y_e = W_d,e (silu(W_g,e x) * (W_u,e x)).
A low-rank expert stores only factors on top of the public expert 0:
    W_p,e = W_p,0 + B_p,e A_p,e      for p in {gate, up, down};  B: [out, rank], A: [rank, in]
and never materialises W_p,e. Because every low-rank expert shares W_*,0 (REFERENCE §5), a token x
routed to a set S of public/low-rank experts with router weights p_e costs
    g0 = W_g,0 x, u0 = W_u,0 x                                     once per token
    z_e = silu(g0 + B_g,e A_g,e x) * (u0 + B_u,e A_u,e x)          per routed expert (rank-sized matmuls)
    y = W_d,0 (sum_e p_e z_e) + sum_e p_e B_d,e (A_d,e z_e)        one dense down projection per token
which equals sum_e p_e y_e exactly (linearity of the down projection). Full-size domain experts cannot
share anything and run as ordinary experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class FullExpert(nn.Module):
    """An ordinary SwiGLU FFN; state-dict keys match FlexOlmo's per-expert keys."""

    rank = 0

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)  # [I, H]
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)  # [I, H]
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)  # [H, I]

    def dense_weight(self, proj: str, public: FullExpert | None = None) -> torch.Tensor:
        return getattr(self, proj).weight


class LowRankExpert(nn.Module):
    """Factors of a correction to the public expert: `{proj}_a` [rank, in] and `{proj}_b` [out, rank]."""

    def __init__(self, hidden_size: int, intermediate_size: int, rank: int):
        super().__init__()
        self.rank = rank
        # nn.Linear(in, out).weight is [out, in], so `_a` = Linear(in, rank), `_b` = Linear(rank, out).
        self.gate_proj_a = nn.Linear(hidden_size, rank, bias=False)  # A_g [r, H]
        self.gate_proj_b = nn.Linear(rank, intermediate_size, bias=False)  # B_g [I, r]
        self.up_proj_a = nn.Linear(hidden_size, rank, bias=False)  # A_u [r, H]
        self.up_proj_b = nn.Linear(rank, intermediate_size, bias=False)  # B_u [I, r]
        self.down_proj_a = nn.Linear(intermediate_size, rank, bias=False)  # A_d [r, I]
        self.down_proj_b = nn.Linear(rank, hidden_size, bias=False)  # B_d [H, r]

    def delta(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        """B (A x) for one projection: two thin matmuls, never the dense B A."""
        a = getattr(self, f"{proj}_a").weight
        b = getattr(self, f"{proj}_b").weight
        return F.linear(F.linear(x, a), b)

    def dense_weight(self, proj: str, public: FullExpert) -> torch.Tensor:
        """W_public + B A — for export and reference checks only, never in the forward pass."""
        a = getattr(self, f"{proj}_a").weight
        b = getattr(self, f"{proj}_b").weight
        base = getattr(public, proj).weight
        return (base.float() + b.float() @ a.float()).to(base.dtype)


def build_expert(hidden_size: int, intermediate_size: int, rank: int) -> FullExpert | LowRankExpert:
    return FullExpert(hidden_size, intermediate_size) if rank == 0 else LowRankExpert(hidden_size, intermediate_size, rank)


class FlexMoREExperts(nn.ModuleList):
    """The experts of one layer; index 0 is the public expert. Keys: `experts.{e}.{proj}[_a|_b].weight`."""

    def __init__(self, experts: list[nn.Module]):
        super().__init__(experts)
        if self[0].rank != 0:
            raise ValueError("expert 0 (public) must be full-size")

    @classmethod
    def build(cls, hidden_size: int, intermediate_size: int, expert_ranks: list[int]) -> FlexMoREExperts:
        return cls([build_expert(hidden_size, intermediate_size, r) for r in expert_ranks])

    @property
    def ranks(self) -> list[int]:
        return [expert.rank for expert in self]

    def forward(
        self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, act_fn=F.silu
    ) -> torch.Tensor:
        """x: [N, H]; top_k_index, top_k_weights: [N, k]. Returns sum over routed e of p_e y_e: [N, H]."""
        n_tokens, num_experts = x.shape[0], len(self)
        public = self[0]
        # route[t, e] = router weight of expert e for token t, 0 where not routed: [N, E]
        route = x.new_zeros(n_tokens, num_experts).scatter_(1, top_k_index, top_k_weights.to(x.dtype))
        routed = torch.zeros(n_tokens, num_experts, dtype=torch.bool, device=x.device)
        routed.scatter_(1, top_k_index, True)
        counts = routed.sum(0).tolist()  # tokens per expert: the one host sync of the layer

        def tokens_of(e: int) -> torch.Tensor | None:
            """Token indices routed to e, or None when that is every token (no gather needed)."""
            return None if counts[e] == n_tokens else routed[:, e].nonzero().squeeze(1)

        out = x.new_zeros(x.shape)  # [N, H]
        low_rank = [e for e in range(1, num_experts) if counts[e] and self[e].rank > 0]
        if counts[0] or low_rank:
            # Public gate/up once per token, for all N tokens: every low-rank expert builds on them, and
            # with the public expert routed nearly every token needs them anyway.
            g0 = F.linear(x, public.gate_proj.weight)  # [N, I]
            u0 = F.linear(x, public.up_proj.weight)  # [N, I]
            # z_sum = sum_e p_e z_e over the public and low-rank experts: [N, I]
            z_sum = act_fn(g0).mul_(u0).mul_(route[:, :1]) if counts[0] else torch.zeros_like(g0)
            grad = torch.is_grad_enabled() and any(p.requires_grad for e in low_rank for p in self[e].parameters())
            low_rank_term = _low_rank_term_autograd if grad else _low_rank_term_inplace
            workspace = None if grad else x.new_empty(2, max((counts[e] for e in low_rank), default=0), g0.shape[1])
            for e in low_rank:
                tokens = tokens_of(e)
                weights = route[:, e : e + 1] if tokens is None else route[tokens, e].unsqueeze(1)  # [n_e, 1]
                z, y = low_rank_term(self[e], x, g0, u0, tokens, weights, act_fn, workspace)
                # z = p_e z_e [n_e, I]; y = p_e B_d A_d z_e [n_e, H]
                if tokens is None:
                    z_sum = z_sum + z if grad else z_sum.add_(z)
                    out = out + y
                else:
                    z_sum = z_sum.index_add(0, tokens, z) if grad else z_sum.index_add_(0, tokens, z)
                    out = out.index_add(0, tokens, y)
            out = out + F.linear(z_sum, public.down_proj.weight)  # W_d,0 sum_e p_e z_e: [N, H]

        for e in range(1, num_experts):  # full-size domain experts share nothing: ordinary FFNs
            expert = self[e]
            if not counts[e] or expert.rank > 0:
                continue
            tokens = tokens_of(e)
            xe = x if tokens is None else x[tokens]
            ye = expert.down_proj(act_fn(expert.gate_proj(xe)) * expert.up_proj(xe))  # [n_e, H]
            weights = route[:, e : e + 1] if tokens is None else route[tokens, e].unsqueeze(1)
            out = out + ye * weights if tokens is None else out.index_add(0, tokens, ye * weights)
        return out


def _low_rank_term_autograd(expert, x, g0, u0, tokens, weights, act_fn, workspace):
    """p_e z_e and p_e B_d A_d z_e for one low-rank expert, out of place (differentiable, for training)."""
    xe, g, u = (x, g0, u0) if tokens is None else (x[tokens], g0[tokens], u0[tokens])  # [n_e, H], [n_e, I]
    z = act_fn(g + expert.delta("gate_proj", xe)) * (u + expert.delta("up_proj", xe)) * weights
    return z, expert.delta("down_proj", z)


def _low_rank_term_inplace(expert, x, g0, u0, tokens, weights, act_fn, workspace):
    """The same for inference, in a reused workspace: each [n_e, I] tensor is touched as few times as possible.

    The router weight is folded into the small up-projection factor product, so p_e costs no extra pass.
    """
    n = x.shape[0] if tokens is None else tokens.shape[0]
    g, u = workspace[0, :n], workspace[1, :n]  # [n_e, I] each
    xe = x if tokens is None else x[tokens]  # [n_e, H]
    a_g = F.linear(xe, expert.gate_proj_a.weight)  # [n_e, r]
    a_u = F.linear(xe, expert.up_proj_a.weight).mul_(weights)  # p_e A_u x: [n_e, r]
    if tokens is None:
        torch.addmm(g0, a_g, expert.gate_proj_b.weight.t(), out=g)  # g0 + B_g A_g x
        torch.mul(u0, weights, out=u)
    else:
        torch.index_select(g0, 0, tokens, out=g).addmm_(a_g, expert.gate_proj_b.weight.t())
        torch.index_select(u0, 0, tokens, out=u).mul_(weights)
    u.addmm_(a_u, expert.up_proj_b.weight.t())  # p_e (u0 + B_u A_u x)
    z = _activate_inplace(act_fn, g).mul_(u)  # p_e z_e
    return z, expert.delta("down_proj", z)


def _activate_inplace(act_fn, t: torch.Tensor) -> torch.Tensor:
    if act_fn is F.silu or isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return F.silu(t, inplace=True)
    return act_fn(t)


class FlexMoRESparseMoeBlock(nn.Module):
    """Router (FlexOlmo's: softmax over all experts in fp32, top-k, no renormalisation) + experts."""

    def __init__(self, config):
        super().__init__()
        self.gate = FlexOlmoTopKRouter(config)  # weight [E, H]
        self.experts = FlexMoREExperts.build(config.hidden_size, config.intermediate_size, list(config.expert_ranks))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [N, H]
        _, top_k_weights, top_k_index = self.gate(x)  # [N, k], [N, k]
        return self.experts(x, top_k_index, top_k_weights, self.act_fn).reshape(batch, seq, hidden)

    @torch.no_grad()
    def keep_experts(self, keep: list[int], top_k: int) -> None:
        """Opt-out: keep only the listed experts and their router rows, in that order."""
        self.experts = FlexMoREExperts([self.experts[e] for e in keep])
        self.gate.weight = nn.Parameter(self.gate.weight[keep].clone(), requires_grad=self.gate.weight.requires_grad)
        self.gate.num_experts = len(keep)
        self.gate.top_k = top_k
