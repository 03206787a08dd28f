"""Training inputs: documents from files, packed token sequences, the public model and its tokenizer.

Documents come from `.jsonl` files (one JSON object with a string "text" field per line) and `.txt`
files (documents separated by blank lines); a directory stands for its `*.jsonl` and `*.txt` files.
Packing follows the usual pretraining recipe: tokenise, append EOS, concatenate, cut into full
sequences, drop the tail.

`PublicModel` is what training needs of the public checkpoint: its architecture as a 1-expert model
and that model's weights (shared weights, expert 0, router row 0). Any FlexOlmo / FlexMoRE checkpoint
works, with any number of experts: expert 0 is the public FFN by convention (REFERENCE §2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PUBLIC, FlexMoREConfig
from ..errors import FlexmoreError
from ..checkpoint import tokenizer_from_dir
from ..jsonl import jsonl_objects

DOC_SUFFIXES = (".jsonl", ".txt")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_ROUTER = re.compile(r"^model\.layers\.\d+\.mlp\.gate\.weight$")


# --------------------------------------------------------------------------------------------------
# Documents


def data_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The data files `paths` stand for: files as given, directories as their sorted *.jsonl / *.txt."""
    if not paths:
        raise FlexmoreError("no data files given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in DOC_SUFFIXES)
            if not found:
                raise FlexmoreError(f"{p}: directory holds no .jsonl or .txt files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in DOC_SUFFIXES:
                raise FlexmoreError(f"{p}: unsupported data file (expected .jsonl or .txt)")
            files.append(p)
        elif p.exists():
            raise FlexmoreError(f"{p}: not a regular file or directory")
        else:
            raise FlexmoreError(f"{p}: no such file or directory")
    return files


def load_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Every document of the given files and directories, in order; each file must hold at least one."""
    texts: list[str] = []
    for file in data_files(paths):
        docs = _read_jsonl(file) if file.suffix == ".jsonl" else _read_txt(file)
        if not docs:
            raise FlexmoreError(f"{file}: empty (no documents)")
        texts.extend(docs)
    return texts


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise FlexmoreError(f"{file}: cannot read ({exc.strerror or type(exc).__name__})") from exc
    except UnicodeDecodeError as exc:
        raise FlexmoreError(f"{file}: cannot read as UTF-8 text (invalid byte at offset {exc.start})") from exc


def _read_jsonl(file: Path) -> list[str]:
    docs = []
    for lineno, obj in jsonl_objects(_read_text(file), file):
        if not isinstance(obj.get("text"), str):
            raise FlexmoreError(f"{file}:{lineno}: expected a JSON object with a string \"text\" field")
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _read_txt(file: Path) -> list[str]:
    text = _read_text(file).replace("\r\n", "\n")
    # keep each document's leading indentation (code); drop only the surrounding blank lines
    return [doc.strip("\n").rstrip() for doc in _BLANK_LINES.split(text) if doc.strip()]


def pack(texts: Sequence[str], tokenizer, seq_len: int) -> torch.LongTensor:
    """Tokenise each document, append EOS, concatenate, cut into full sequences: [n_seq, seq_len].

    The tail that does not fill a sequence is dropped; too little text for one sequence is an error.
    """
    if seq_len < 2:
        raise FlexmoreError(f"--seq-len {seq_len}: must be at least 2 (next-token prediction)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FlexmoreError("the tokenizer has no end-of-text (EOS) token; packing needs one between documents")
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    flat = [t for doc in ids for t in (*doc, eos)]
    n_seq = len(flat) // seq_len
    if n_seq == 0:
        raise FlexmoreError(
            f"too little text: {len(flat)} tokens in {len(texts)} documents, fewer than one sequence of "
            f"--seq-len {seq_len}"
        )
    return torch.tensor(flat[: n_seq * seq_len], dtype=torch.long).view(n_seq, seq_len)


# --------------------------------------------------------------------------------------------------
# The public model


@dataclass
class PublicModel:
    """The public model as training sees it: a 1-expert architecture and its weights.

    `state` holds every tensor of that 1-expert FlexMoRE model under its checkpoint name: shared
    weights, expert 0 (`...experts.0.*`) and router row 0 (`...mlp.gate.weight`, [1, H]).
    """

    config: FlexMoREConfig  # num_experts = 1, num_experts_per_tok = 1
    state: dict[str, torch.Tensor]
    source: Path | None  # the checkpoint directory, when there is one (tokenizer files, provenance)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.state.values())).dtype

    def describe(self) -> str:
        return str(self.source) if self.source is not None else "<in-memory public model>"

    def build(self) -> torch.nn.Module:
        """The public model alone (1 expert, dense), in float32, eval mode."""
        from transformers.initialization import no_init_weights

        from ..modeling import FlexMoREForCausalLM

        with no_init_weights():  # every weight is overwritten below; skip the random init
            model = FlexMoREForCausalLM(self.config)
        load_exact(model, self.state)
        return model.float().eval()


def public_config(config: FlexMoREConfig) -> FlexMoREConfig:
    """The 1-expert (public only) config of any FlexOlmo/FlexMoRE config."""
    from ..convert import mixture_config

    return mixture_config(config, keep=[PUBLIC], expert_ranks=[0], top_k=1)


def load_public(public) -> PublicModel:
    """The public model from a checkpoint path / hub id, a loaded FlexMoRE or FlexOlmo model, or a PublicModel.

    Only expert 0 and router row 0 are read: the other experts of a checkpoint never leave the disk.
    """
    if isinstance(public, PublicModel):
        return public
    from transformers import FlexOlmoForCausalLM

    from ..convert import expected_shapes, open_checkpoint
    from ..modeling import FlexMoREForCausalLM

    if isinstance(public, (str, os.PathLike)):
        reader, config = open_checkpoint(public)
        one = public_config(config)
        state = {name: _public_slice(name, reader.get(name)) for name in expected_shapes(one)}
        return PublicModel(one, state, reader.path)
    if isinstance(public, FlexMoREForCausalLM):
        one = public_config(public.config)
        full = public.state_dict()
        state = {name: _public_slice(name, full[name].detach()) for name in expected_shapes(one)}
        return PublicModel(one, state, _model_dir(public))
    if isinstance(public, FlexOlmoForCausalLM):
        one = public_config(FlexMoREConfig.from_flexolmo(public.config))
        state = _unfuse_public(public, expected_shapes(one))
        return PublicModel(one, state, _model_dir(public))
    raise FlexmoreError(
        f"public model: expected a checkpoint directory or a FlexOlmo/FlexMoRE model, got {type(public).__name__}"
    )


def _public_slice(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor[PUBLIC : PUBLIC + 1] if _ROUTER.match(name) else tensor


def _unfuse_public(model, names) -> dict[str, torch.Tensor]:
    """Expert 0 of transformers' in-memory fused layout (gate_up_proj [E, 2I, H], gate rows first)."""
    full = model.state_dict()
    inter = model.config.intermediate_size
    state = {}
    for name in names:
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.0\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m is None:
            state[name] = _public_slice(name, full[name].detach())
        elif m[2] == "down_proj":
            state[name] = full[f"{m[1]}.down_proj"][PUBLIC].detach()  # [H, I]
        else:
            fused = full[f"{m[1]}.gate_up_proj"][PUBLIC].detach()  # [2I, H]
            state[name] = fused[:inter] if m[2] == "gate_proj" else fused[inter:]
    return state


def _model_dir(model) -> Path | None:
    path = Path(str(getattr(model, "name_or_path", "") or ""))
    return path if str(path) not in ("", ".") and path.is_dir() else None


def load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model`; every parameter must be covered (a tied lm_head may be absent)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state does not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    if model.config.tie_word_embeddings:
        model.tie_weights()


def load_tokenizer(public: PublicModel, tokenizer=None):
    """The public model's tokenizer (given, or from its checkpoint directory), checked against its vocabulary."""
    if tokenizer is None:
        if public.source is None:
            raise FlexmoreError("the public model was given in memory without a directory; pass its tokenizer")
        tokenizer = tokenizer_from_dir(public.source)
    check_tokenizer(tokenizer, public.vocab_size, public.describe())
    return tokenizer


def check_tokenizer(tokenizer, vocab_size: int, where: str) -> None:
    """Every id the tokenizer can produce must index the embedding (padding the embedding is fine)."""
    if len(tokenizer) > vocab_size:
        raise FlexmoreError(
            f"{where}: tokenizer mismatch: the tokenizer has {len(tokenizer)} tokens but the model's embedding "
            f"has {vocab_size} rows"
        )
