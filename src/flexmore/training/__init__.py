"""Expert training (FlexOlmo recipe, full-size or low-rank) and domain router embeddings.

    data.py     documents from .jsonl/.txt, token packing, the public model and its tokenizer
    embed.py    domain embeddings -> router rows (the public model's hidden states or an external embedder)
    expert.py   the 2-expert [public, domain] model, its training loop, resumable checkpoints, held-out loss
"""

from .data import PublicModel, load_public, load_texts, pack
from .embed import domain_embedding, load_router_row, write_router_row
from .expert import TrainConfig, build_two_expert, heldout_loss, train_expert

__all__ = [
    "PublicModel",
    "TrainConfig",
    "build_two_expert",
    "domain_embedding",
    "heldout_loss",
    "load_public",
    "load_router_row",
    "load_texts",
    "pack",
    "train_expert",
    "write_router_row",
]
