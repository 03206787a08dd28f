"""PHLoRA extraction: truncated SVD of each expert's delta from the public expert (svd.py), rank
policies (ranks.py) and the streaming pipeline with its resumable SVD cache (pipeline.py)."""

from .pipeline import SvdCache, SvdSettings, assemble_checkpoint, build_svd_cache, extract
from .svd import Factorization, truncated_svd

__all__ = ["Factorization", "SvdCache", "SvdSettings", "assemble_checkpoint", "build_svd_cache", "extract",
           "truncated_svd"]
