"""bicache_jax: serve diffusion language models in JAX with BiCache shared-prefix caching."""

from importlib.metadata import PackageNotFoundError, version

from .checkpoint import LoadedModel, load, restore, save
from .config import ModelConfig, dream_7b, llada_8b, preset
from .generate import GenerateOutput, Prompt, compile_count, generate
from .model import PrefixKV, encode_prefix, forward, forward_rows, init_params
from .policies import POLICIES
from .prefix_store import PrefixStore
from .sampling import SamplerConfig
from .serving import Engine, Request
from .tokenizer import Tokenizer

try:
    __version__ = version("bicache-jax")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["POLICIES", "Engine", "GenerateOutput", "LoadedModel", "ModelConfig", "PrefixKV",
           "PrefixStore", "Prompt", "Request", "SamplerConfig", "Tokenizer", "__version__",
           "compile_count", "dream_7b", "encode_prefix", "forward", "forward_rows", "generate",
           "init_params", "llada_8b", "load", "preset", "restore", "save"]
