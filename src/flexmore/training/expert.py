"""Train one data owner's domain expert (FlexOlmo recipe, REFERENCE §6), full-size or low-rank.

The model is a 2-expert MoE [public, domain] with top-2-of-2 routing, built from the public model:
    shared weights (embeddings, attention, norms, lm_head)   the public model's, frozen
    expert 0                                                  the public FFN, frozen
    expert 1                                                  rank 0: a copy of the public FFN, trained
                                                              rank R: public FFN + B A, A random, B = 0, trained
    router row 0                                              the public checkpoint's row 0, frozen
    router row 1                                              the domain embedding (embed.py), trained
Because both experts start as the public FFN (or B = 0) and top-2-of-2 weights sum to one, the model
starts exactly at the public model. Row 0 is kept bit-identical twice over: a gradient hook zeroes
its gradient, and the router gets no weight decay, so AdamW's update for it is exactly zero. That is
what lets `flexmore merge` combine owners: every owner's shared weights, expert 0 and row 0 are the
public model's, bit for bit.

Optionally a learnable bias min(b, 0) is added to the domain expert's router logit during training
only (FlexOlmo's negative bias); the HF format has no router bias, so it is not exported.

Checkpoints (every `checkpoint_every` steps) go to OUT's sibling `OUT.train/step-NNNNNNNN/`:
`state.safetensors` (trainable parameters, AdamW's exp_avg / exp_avg_sq / step, torch's RNG state)
and `state.json` (step, data position, settings). Safetensors and JSON only. The data order is a
function of the seed and the step, so a resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.flex_olmo.modeling_flex_olmo import FlexOlmoTopKRouter

from ..config import PUBLIC, FlexMoREConfig
from ..errors import FlexmoreError
from .data import PublicModel, check_tokenizer, load_exact, load_public, load_texts, load_tokenizer, pack
from .embed import domain_embedding, load_router_row

DOMAIN = 1  # index of the trained expert in the 2-expert model
PUBLIC_NAME = "public"
ADAM_BETAS = (0.9, 0.95)  # OLMo's
ADAM_EPS = 1e-8
GRAD_CLIP = 1.0  # max global gradient norm
MIN_LR_RATIO = 0.1  # cosine decay ends at this fraction of --lr
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
# Settings a resumed run must share with the checkpoint: they fix the data order, the schedule and the model.
_RESUME_FIELDS = ("steps", "batch_size", "seq_len", "lr", "weight_decay", "warmup_steps", "seed", "rank",
                  "negative_bias", "expert_name")


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """Settings of one expert-training run (each field is also a `flexmore train-expert` option)."""

    steps: int = _help("Optimizer steps.", 1000)
    batch_size: int = _help("Sequences per step.", 8)
    seq_len: int = _help("Tokens per training sequence (documents are packed with EOS between them).", 256)
    lr: float = _help("Peak learning rate (linear warmup, then cosine decay to 10% of it).", 1e-4)
    weight_decay: float = _help("AdamW weight decay of the expert's weights (the router gets none).", 0.1)
    warmup_steps: int = _help("Linear learning-rate warmup steps.", 100)
    seed: int = _help("Seed of the data order and the low-rank init; same seed, same weights.", 0)
    rank: int = _help(
        "0: full-size expert (the FlexOlmo recipe); R > 0: public FFN + rank-R correction B A (B starts at zero).", 0
    )
    negative_bias: bool = _help(
        "Add a learnable bias min(b, 0) to the domain expert's router logit during training (not exported).", False
    )
    checkpoint_every: int = _help("Write a resumable checkpoint to OUT.train/ every N steps (0: never).", 100)
    router_init: str | None = _help(
        "Router-row file from `flexmore embed` for the domain row (default: embed the training documents).", None
    )
    expert_name: str | None = _help("Name of the domain expert (default: the output directory's name).", None)
    max_docs_embed: int = _help("Documents embedded for the default router row.", 1000)
    device: str = _help("Where training runs: cpu, cuda, cuda:1, ...", "cpu")

    def validate(self) -> None:
        positive = ("steps", "batch_size", "max_docs_embed")
        for name in positive:
            if getattr(self, name) < 1:
                raise FlexmoreError(f"{option(name)} {getattr(self, name)}: must be at least 1")
        for name in ("weight_decay", "warmup_steps", "seed", "rank", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise FlexmoreError(f"{option(name)} {getattr(self, name)}: must not be negative")
        if self.seq_len < 2:
            raise FlexmoreError(f"--seq-len {self.seq_len}: must be at least 2 (next-token prediction)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FlexmoreError(f"--lr {self.lr}: must be a positive number")
        if self.expert_name is not None:
            check_expert_name(self.expert_name)


def option(name: str) -> str:
    """The CLI option of a TrainConfig field."""
    return "--name" if name == "expert_name" else "--" + name.replace("_", "-")


def config_help(name: str) -> str:
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


def check_expert_name(name: str) -> None:
    if not name.strip():
        raise FlexmoreError("--name: the expert name is empty")
    if name == PUBLIC_NAME:
        raise FlexmoreError("--name: 'public' is the name of expert 0 (the public expert); choose another")


# --------------------------------------------------------------------------------------------------
# The 2-expert model


class NegativeBiasRouter(FlexOlmoTopKRouter):
    """FlexOlmo's router plus a learnable min(b, 0) on every non-public logit (training only).

    Shares the original router's weight Parameter. b starts at 0, where the clamp still passes gradient.
    """

    def __init__(self, router: FlexOlmoTopKRouter):
        nn.Module.__init__(self)
        self.top_k, self.num_experts = router.top_k, router.num_experts
        self.norm_topk_prob, self.hidden_dim = router.norm_topk_prob, router.hidden_dim
        self.weight = router.weight  # [E, H]
        self.negative_bias = nn.Parameter(torch.zeros(router.num_experts - 1, device=router.weight.device))  # [E-1]

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, self.hidden_dim)  # [N, H]
        bias = torch.cat([self.negative_bias.new_zeros(1), torch.clamp(self.negative_bias, max=0.0)])  # [E]
        router_logits = F.linear(x, self.weight) + bias.to(x.dtype)  # [N, E]
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


def two_expert_config(public: PublicModel, rank: int, expert_name: str) -> FlexMoREConfig:
    d = {k: v for k, v in public.config.to_dict().items()
         if k not in ("model_type", "architectures", "transformers_version", "auto_map", "expert_ranks",
                      "expert_names", "dtype", "torch_dtype")}
    d.update(num_experts=2, num_experts_per_tok=2)
    try:
        config = FlexMoREConfig(**d, expert_ranks=[0, rank], expert_names=[PUBLIC_NAME, expert_name])
    except FlexmoreError as exc:
        raise FlexmoreError(f"--rank {rank}: {str(exc).removeprefix('config: ')}") from exc
    config.architectures = ["FlexMoREForCausalLM"]
    return config


def build_two_expert(public, rank: int, router_row: torch.Tensor, expert_name: str = "expert1"):
    """The 2-expert model [public, domain] an owner trains, in float32 (see the module docstring).

    public: checkpoint path, loaded model or PublicModel; rank: 0 (full) or R; router_row: [H], the
    domain row (the same row in every layer). Router row 0 is the public checkpoint's own row 0, which
    every owner shares, so their experts merge. A low-rank A is kaiming-uniform from torch's global RNG.
    """
    from transformers.initialization import no_init_weights

    from ..modeling import FlexMoREForCausalLM

    pub = load_public(public)
    row = torch.as_tensor(router_row).detach().float()
    if tuple(row.shape) != (pub.hidden_size,):
        raise FlexmoreError(f"router row has shape {list(row.shape)}, expected [{pub.hidden_size}] (the hidden size)")
    config = two_expert_config(pub, rank, expert_name)
    state: dict[str, torch.Tensor] = {}
    for name, value in pub.state.items():
        if name.endswith(".mlp.gate.weight"):
            state[name] = torch.cat([value[PUBLIC : PUBLIC + 1].float(), row[None]])  # [2, H]
        elif ".mlp.experts.0." in name:
            state[name] = value
            if rank == 0:
                state[name.replace(".experts.0.", ".experts.1.")] = value.clone()
        else:
            state[name] = value
    if rank > 0:
        for layer in range(config.num_hidden_layers):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out_dim, in_dim = pub.state[f"model.layers.{layer}.mlp.experts.0.{proj}.weight"].shape
                a = torch.empty(rank, in_dim)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as LoRA: A random, B zero
                state[f"model.layers.{layer}.mlp.experts.1.{proj}_a.weight"] = a  # [R, in]
                state[f"model.layers.{layer}.mlp.experts.1.{proj}_b.weight"] = torch.zeros(out_dim, rank)  # [out, R]
    with no_init_weights():  # every weight is set from `state`
        model = FlexMoREForCausalLM(config)
    load_exact(model, state)
    return model.float().eval()


def add_negative_bias(model) -> None:
    for block in model.moe_blocks():
        block.gate = NegativeBiasRouter(block.gate)


def trainable_parameters(model) -> dict[str, nn.Parameter]:
    """Expert 1, the router weights (row 0 masked by a hook) and the negative biases, by name."""
    return {name: p for name, p in model.named_parameters()
            if f".mlp.experts.{DOMAIN}." in name or ".mlp.gate." in name}


def _zero_public_row(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[PUBLIC] = 0
    return grad


# --------------------------------------------------------------------------------------------------
# Data order and schedule: pure functions of (seed, step), so resuming needs no iterator state


def batch_indices(step: int, batch_size: int, n_seq: int, seed: int) -> tuple[torch.Tensor, int, int]:
    """Sequence indices of step `step` (1-based): a fresh seeded permutation per epoch; and (epoch, position)
    at the start of the step."""
    start = (step - 1) * batch_size
    out = []
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n_seq)
        out.append(epoch_order(n_seq, seed, epoch)[pos])
    epoch, pos = divmod(start, n_seq)
    return torch.stack(out), epoch, pos


@functools.lru_cache(maxsize=4)
def epoch_order(n_seq: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the sequences in one epoch: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n_seq, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def lr_at(step: int, config: TrainConfig) -> float:
    warmup = min(config.warmup_steps, config.steps)
    if step <= warmup:
        return config.lr * step / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.lr * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------
# Training


def train_dir(out: str | os.PathLike) -> Path:
    """Where the resumable checkpoints of a run writing OUT live: OUT's sibling OUT.train/."""
    out = Path(out)
    return out.parent / f"{out.name}.train"


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FlexmoreError(f"--device {name!r}: not a device (cpu, cuda, cuda:1, ...)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlexmoreError(f"--device {name}: no CUDA device is available")
    return device


def train_expert(
    public,
    data_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: TrainConfig,
    resume: bool = False,
    on_step: Callable[[int, float, float], None] | None = None,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Train a domain expert on the documents of `data_paths` and write the 2-expert checkpoint OUT.

    rank 0 writes a FlexOlmo checkpoint, rank R a FlexMoRE one; expert names [public, NAME] (NAME:
    config.expert_name or OUT's name) and the public checkpoint's tokenizer files travel with it.
    resume: continue from the last checkpoint in OUT.train/ (a fresh start when there is none); the
    result equals an uninterrupted run's. Without it, existing checkpoints are an error unless `overwrite`.
    on_step(step, loss, tokens_per_s) is called after every step (and after that step's checkpoint).
    OUT.train/ is removed once OUT is written. An existing OUT is an error unless `overwrite`.
    """
    config.validate()
    out = Path(out)
    name = config.expert_name or out.resolve().name
    check_expert_name(name)
    # the resolved settings, JSON-ready (they go into the checkpoints and the output's flexmore.json)
    config = TrainConfig(**{**asdict(config), "expert_name": name, "device": str(config.device),
                            "router_init": None if config.router_init is None else str(config.router_init)})
    if out.exists() and not overwrite:
        raise FlexmoreError(f"{out}: already exists (pass --overwrite to replace it)")
    state_dir = train_dir(out)
    last = latest_checkpoint(state_dir)
    if last is not None and not resume and not overwrite:
        raise FlexmoreError(
            f"{state_dir}: holds checkpoints of an earlier run; pass --resume to continue it or --overwrite to start over"
        )
    device = resolve_device(config.device)

    pub = load_public(public)
    tok = load_tokenizer(pub, tokenizer)
    if config.seq_len > pub.config.max_position_embeddings:
        raise FlexmoreError(
            f"--seq-len {config.seq_len}: above the public model's max_position_embeddings "
            f"({pub.config.max_position_embeddings})"
        )
    if config.rank > min(pub.hidden_size, pub.config.intermediate_size):
        raise FlexmoreError(f"--rank {config.rank}: above min(hidden_size, intermediate_size) = "
                            f"{min(pub.hidden_size, pub.config.intermediate_size)}")
    texts = load_texts(data_paths)
    data = pack(texts, tok, config.seq_len)  # [n_seq, seq_len]
    data_digest = hashlib.sha256(data.numpy().data).hexdigest()  # fingerprint: a resume must see the same data
    saved = read_checkpoint(last, config, data_digest) if (resume and last is not None) else None

    if saved is None:
        if config.router_init is not None:
            row = load_router_row(config.router_init, pub.hidden_size)
        else:
            row = domain_embedding(pub, texts, max_docs=config.max_docs_embed, seq_len=config.seq_len,
                                   tokenizer=tok, device=device)
    else:
        row = torch.zeros(pub.hidden_size)  # overwritten by the checkpoint's router weights
    if saved is None and state_dir.exists():
        shutil.rmtree(state_dir)  # a fresh start: no stale checkpoint may be resumed later
    torch.manual_seed(config.seed)
    model = build_two_expert(pub, config.rank, row, name).to(device)
    if config.negative_bias:
        add_negative_bias(model)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = trainable_parameters(model)
    for pname, p in trainable.items():
        p.requires_grad_(True)
        if pname.endswith(".mlp.gate.weight"):
            p.register_hook(_zero_public_row)
    decay = [p for n, p in trainable.items() if ".mlp.experts." in n]
    no_decay = [p for n, p in trainable.items() if ".mlp.experts." not in n]  # router rows, biases
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
    )
    start = 0
    if saved is not None:
        start = restore_state(saved, trainable, optimizer, device)

    model.train()
    loss_value = float("nan")
    for step in range(start + 1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        index, _, _ = batch_indices(step, config.batch_size, data.shape[0], config.seed)
        batch = data[index].to(device)  # [B, T]
        began = time.perf_counter()
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), GRAD_CLIP)
        optimizer.step()
        loss_value = loss.item()
        tokens_per_s = batch.numel() / max(time.perf_counter() - began, 1e-9)
        if not math.isfinite(loss_value):
            raise FlexmoreError(f"step {step}: the loss is {loss_value}; lower --lr")
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            write_checkpoint(state_dir, step, trainable, optimizer, config, pub, data_paths, data, data_digest,
                             loss_value)
        if on_step is not None:
            on_step(step, loss_value, tokens_per_s)

    meta = {
        "operation": "train-expert",
        "public": pub.describe(),
        "data": [str(p) for p in data_paths],
        "train_config": asdict(config),
        "sequences": int(data.shape[0]),
        "tokens_seen": config.steps * config.batch_size * config.seq_len,
        "final_loss": loss_value,
        "resumed_from_step": start or None,
    }
    export_expert(model.cpu(), pub, out, tok if tokenizer is not None else None, meta, overwrite)
    shutil.rmtree(state_dir, ignore_errors=True)
    return out


def export_expert(model, pub: PublicModel, out: Path, tokenizer, meta: dict, overwrite: bool) -> Path:
    """The 2-expert checkpoint, in the public model's dtype: FlexOlmo when full-size, else FlexMoRE.

    Tensor names come from the config, so the training-only negative bias is left out.
    """
    from ..checkpoint import CheckpointReader, CheckpointWriter
    from ..convert import expected_shapes, flexolmo_config

    config: FlexMoREConfig = model.config
    state = model.state_dict()
    dtype_name = str(pub.dtype).removeprefix("torch.")
    saved_config = flexolmo_config(config) if config.expert_ranks[DOMAIN] == 0 else config
    saved_config.dtype = dtype_name
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        for name in expected_shapes(config):
            writer.add(name, state[name].detach().to(pub.dtype))
        saved_config.save_pretrained(writer.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.tmp)
        elif pub.source is not None:
            for file in CheckpointReader(pub.source).extra_files():
                writer.copy_file(file)
        writer.commit({**meta, "expert_names": config.expert_names, "expert_ranks": config.expert_ranks,
                       "num_experts_per_tok": config.num_experts_per_tok})
    return out


# --------------------------------------------------------------------------------------------------
# Resumable checkpoints (safetensors + JSON)


def latest_checkpoint(state_dir: Path) -> Path | None:
    if not state_dir.is_dir():
        return None
    done = [d for d in state_dir.glob("step-*") if (d / STATE_TENSORS).is_file() and (d / STATE_JSON).is_file()]
    return max(done, key=lambda d: d.name) if done else None


def write_checkpoint(state_dir: Path, step: int, trainable: dict[str, nn.Parameter], optimizer, config: TrainConfig,
                     pub: PublicModel, data_paths, data: torch.Tensor, data_digest: str, loss: float) -> Path:
    """Trainable weights, AdamW state and RNG into state_dir/step-N (temp dir + rename); older steps removed."""
    from safetensors.torch import save_file

    from .. import __version__

    tensors = {"rng/torch": torch.get_rng_state()}
    for name, p in trainable.items():
        tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        for key, value in optimizer.state[p].items():  # exp_avg, exp_avg_sq, step
            tensors[f"adam/{name}/{key}"] = value.detach().cpu().contiguous()
    _, epoch, pos = batch_indices(step + 1, config.batch_size, data.shape[0], config.seed)
    meta = {
        "flexmore_version": __version__,
        "step": step,
        "data_position": {"epoch": epoch, "sequence": pos, "sequences": int(data.shape[0]), "sha256": data_digest},
        "train_config": asdict(config),
        "public": pub.describe(),
        "data": [str(p) for p in data_paths],
        "loss": loss,
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / f"step-{step:08d}"
    tmp = state_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt"})
    (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in [*state_dir.glob("step-*"), *state_dir.glob(".step-*")]:  # older steps, interrupted writes
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class SavedState:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]


def read_checkpoint(path: Path, config: TrainConfig, data_digest: str) -> SavedState:
    """A checkpoint that this run may continue: same settings, same data."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(str(path / STATE_TENSORS))
        step, saved = int(meta["step"]), meta["train_config"]
    except Exception as exc:  # a damaged checkpoint: name it, whatever broke
        raise FlexmoreError(f"{path}: unreadable training checkpoint ({type(exc).__name__}); "
                            "remove it or pass --overwrite to start over") from exc
    for name in _RESUME_FIELDS:
        if saved.get(name) != getattr(config, name):
            raise FlexmoreError(
                f"{path}: written with {option(name)} {saved.get(name)}, this run has {getattr(config, name)}; "
                "resume with the same settings or pass --overwrite to start over"
            )
    if meta.get("data_position", {}).get("sha256") != data_digest:
        raise FlexmoreError(f"{path}: the training data differ from this checkpoint's; resume with the same data")
    return SavedState(path, step, tensors)


def restore_state(saved: SavedState, trainable: dict[str, nn.Parameter], optimizer, device) -> int:
    """Put the checkpoint's weights, AdamW state and RNG back; returns the step it was written at."""
    try:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved.tensors[f"param/{name}"])
                optimizer.state[p] = {key: saved.tensors[f"adam/{name}/{key}"].to(device)
                                      for key in ("step", "exp_avg", "exp_avg_sq")}
        torch.set_rng_state(saved.tensors["rng/torch"])
    except (KeyError, RuntimeError) as exc:
        raise FlexmoreError(f"{saved.path}: training checkpoint does not fit this model ({exc})") from exc
    return saved.step


# --------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def heldout_loss(model_or_path, texts: Sequence[str], seq_len: int, batch_size: int = 8, *, tokenizer=None,
                 device: str | torch.device | None = None) -> float:
    """Mean next-token loss (nats per predicted token) of a model on `texts`, packed as for training.

    model_or_path: a checkpoint path (any number of experts, its own k), or a loaded causal LM; its
    tokenizer comes from the checkpoint directory unless given.
    """
    from ..convert import load_model
    from ..checkpoint import tokenizer_from_dir
    from .data import _model_dir

    if isinstance(model_or_path, (str, os.PathLike)):
        model = load_model(model_or_path)
        source = Path(model_or_path)
    else:
        model, source = model_or_path, _model_dir(model_or_path)
    if tokenizer is None:
        if source is None:
            raise FlexmoreError("held-out loss: the model was given in memory without a directory; pass its tokenizer")
        tokenizer = tokenizer_from_dir(source)
    check_tokenizer(tokenizer, model.config.vocab_size, str(source or "the model"))
    data = pack(texts, tokenizer, seq_len)  # [n_seq, seq_len]
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size].to(device)
            total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * batch.shape[0]
    finally:
        model.train(was_training)
    return total / data.shape[0]
