"""Domain embeddings: the router row a domain expert starts from (FlexOlmo recipe, REFERENCE §6).

A domain's row is the mean embedding of up to ~1000 of its documents. FlexOlmo embedded documents with
an external embedding model; the offline fallback used here by default is the public model's own
final hidden states, mean-pooled over each document's tokens (attention-mask aware), then averaged
over documents. An external model (`embedder`) must produce vectors of the public model's hidden
size, since the row is used as is in every layer's router: no projection is learned.
The row is not normalised: its scale is what the embedding model gives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import FlexmoreError
from .data import PublicModel, load_public, load_tokenizer

ROUTER_ROW_KEY = "router_row"


def sample_docs(texts: Sequence[str], max_docs: int, seed: int = 0) -> list[str]:
    """Up to `max_docs` documents: all of them, or a seeded random sample kept in corpus order."""
    if max_docs < 1:
        raise FlexmoreError(f"--max-docs {max_docs}: must be at least 1")
    if len(texts) <= max_docs:
        return list(texts)
    picked = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:max_docs]
    return [texts[i] for i in sorted(picked.tolist())]


@torch.no_grad()
def domain_embedding(
    public,
    texts: Sequence[str],
    max_docs: int = 1000,
    batch_size: int = 8,
    seq_len: int = 256,
    embedder: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Mean embedding of up to `max_docs` documents: [H] float32, H the public model's hidden size.

    public: a checkpoint path or a loaded model (expert 0 is the public FFN; other experts are ignored).
    embedder: path or id of an external HF AutoModel (and its tokenizer) of hidden size H; default: the
    public model's own mean-pooled final hidden states. Documents are cut at `seq_len` tokens.
    `tokenizer` is the public model's, when `public` is an in-memory model without a directory.
    """
    if batch_size < 1:
        raise FlexmoreError(f"--batch-size {batch_size}: must be at least 1")
    if seq_len < 1:
        raise FlexmoreError(f"--seq-len {seq_len}: must be at least 1")
    docs = sample_docs(texts, max_docs)
    if not docs:
        raise FlexmoreError("domain embedding: no documents to embed")
    pub = load_public(public)
    if embedder is None:
        tok = load_tokenizer(pub, tokenizer)
        model = pub.build().to(device)
        encoder, special = model.model, False  # the decoder without lm_head: final (normed) hidden states
        seq_len = min(seq_len, pub.config.max_position_embeddings)
    else:
        encoder, tok = load_embedder(embedder, pub)
        encoder = encoder.to(device)
        special = True  # an embedding model expects its own special tokens ([CLS], ...)
        seq_len = min(seq_len, getattr(tok, "model_max_length", seq_len) or seq_len)
    total = torch.zeros(pub.hidden_size, dtype=torch.float64)
    for start in range(0, len(docs), batch_size):
        ids, mask = _encode(tok, docs[start : start + batch_size], seq_len, special)  # [B, T] each
        hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # [B, T, H]
        weights = mask.to(device=device, dtype=torch.float64).unsqueeze(-1)  # [B, T, 1]
        per_doc = (hidden.double() * weights).sum(1) / weights.sum(1)  # mask-aware mean over tokens: [B, H]
        total += per_doc.sum(0).cpu()
    return (total / len(docs)).float()


def _encode(tok, docs: list[str], seq_len: int, special: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and attention mask [B, T]; padding by hand, so no pad token is needed."""
    rows = tok(docs, add_special_tokens=special, truncation=True, max_length=seq_len, verbose=False)["input_ids"]
    rows = [r if r else [tok.eos_token_id if tok.eos_token_id is not None else 0] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def load_embedder(embedder: str | os.PathLike, public: PublicModel):
    """An external embedding model and its tokenizer (safetensors only, no remote code), of hidden size H."""
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(str(embedder), use_safetensors=True).float().eval()
        tok = AutoTokenizer.from_pretrained(str(embedder))
    except Exception as exc:  # hub, config and weight errors come in many types; the user needs one line
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FlexmoreError(f"--embedder {embedder}: cannot load an embedding model and tokenizer ({detail})") from exc
    size = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
    if size != public.hidden_size:
        raise FlexmoreError(
            f"--embedder {embedder}: its hidden size is {size} but the public model's is {public.hidden_size}; "
            "a router row must have the public model's hidden size"
        )
    return model, tok


# --------------------------------------------------------------------------------------------------
# Router-row files: {"router_row": [H]} in safetensors, with a JSON sidecar of metadata


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def check_router_row_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that is not .safetensors or that exists (unless `overwrite`)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise FlexmoreError(f"--out {out}: the router row file must end in .safetensors")
    for path in (out, sidecar(out)):
        if path.is_dir():
            raise FlexmoreError(f"{path}: is a directory")
        if path.exists() and not overwrite:
            raise FlexmoreError(f"{path}: already exists (pass --overwrite to replace it)")
    return out


def write_router_row(out: str | os.PathLike, row: torch.Tensor, meta: dict, overwrite: bool = False) -> Path:
    """Write `row` to OUT (.safetensors) and its metadata to OUT's .json sidecar, each atomically."""
    from safetensors.torch import save_file

    from .. import __version__

    out = check_router_row_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp_meta = out.parent / f".{sidecar(out).name}.tmp-{os.getpid()}"
    try:
        save_file({ROUTER_ROW_KEY: row.detach().float().contiguous().cpu()}, str(tmp), metadata={"format": "pt"})
        meta = {"flexmore_version": __version__, "hidden_size": int(row.numel()), **meta}
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_meta, sidecar(out))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return out


def load_router_row(path: str | os.PathLike, hidden_size: int) -> torch.Tensor:
    """The [H] row of a file written by `flexmore embed`, checked against the public model's hidden size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FlexmoreError(f"--router-init {path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FlexmoreError(f"--router-init {path}: not a safetensors file ({type(exc).__name__})") from exc
    row = tensors.get(ROUTER_ROW_KEY)
    if row is None:
        raise FlexmoreError(f"--router-init {path}: no tensor {ROUTER_ROW_KEY!r} (write one with `flexmore embed`)")
    if tuple(row.shape) != (hidden_size,):
        raise FlexmoreError(
            f"--router-init {path}: {ROUTER_ROW_KEY} has shape {list(row.shape)}, expected [{hidden_size}] "
            "(the public model's hidden size)"
        )
    if not torch.isfinite(row).all():
        raise FlexmoreError(f"--router-init {path}: {ROUTER_ROW_KEY} contains NaN or Inf values")
    return row.float()
