"""HF checkpoint conversion (LLaDA, Dream) -> `ModelConfig` + params pytree.

Importable as `bicache_jax.convert`.
"""

from .convert import check_source, convert_hf
from .hf_config import hf_to_model_config, layout_of, load_model_config, read_hf_config
from .key_maps import TensorSpec, key_map, param_shapes
from .safetensors_reader import CheckpointError, TensorSource, open_checkpoint

__all__ = ["CheckpointError", "TensorSource", "TensorSpec", "check_source", "convert_hf",
           "hf_to_model_config", "key_map", "layout_of", "load_model_config",
           "open_checkpoint", "param_shapes", "read_hf_config"]
