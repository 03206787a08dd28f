"""flexmore: Flexible Mixtures of Rank-heterogeneous Experts.

Importing the package registers the `flexmore` model type with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved FlexMoRE checkpoint without remote code.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flexmore")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from .config import FlexMoREConfig, ParamCount, count_parameters, parse_rank_spec  # noqa: E402
from .errors import FlexmoreError  # noqa: E402
from .modeling import FlexMoREForCausalLM, FlexMoREModel  # noqa: E402

__all__ = [
    "FlexMoREConfig",
    "FlexMoREForCausalLM",
    "FlexMoREModel",
    "FlexmoreError",
    "ParamCount",
    "count_parameters",
    "parse_rank_spec",
    "__version__",
]
