"""Convert an HF LLaDA / Dream checkpoint folder to our `(ModelConfig, params)`.

The whole checkpoint is checked before any tensor data is read: every expected key must
be present, no unexpected key may remain (known weightless buffers such as
`rotary_emb.inv_freq` excepted), and every stored shape must match the config. Then each
params array is allocated once on the host in the target dtype, filled tensor by tensor
(stacked layer arrays layer by layer), handed to JAX and dropped, so that host memory
peaks near the output plus one stacked array plus one HF tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from ..config import ModelConfig
from .hf_config import load_model_config
from .key_maps import ParamPath, TensorSpec, is_ignored_key, key_map, param_shapes
from .safetensors_reader import CheckpointError, TensorSource, open_checkpoint

DType = Literal["float32", "bfloat16"]
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_FLOAT_SOURCES = {"F64", "F32", "F16", "BF16"}


def _list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_source(source: TensorSource, specs: list[TensorSpec], folder: Path) -> None:
    """Raise `ValueError` unless `source` holds exactly the `specs` keys with their shapes.

    Missing keys, unexpected keys, wrong shapes and non-float dtypes are all collected
    into one message naming the keys (and the file for those that exist).
    """
    expected = {s.hf_key: s for s in specs}
    have = set(source.keys())
    problems = []
    missing = [s.hf_key for s in specs if s.hf_key not in have]
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    unexpected = [k for k in source.keys() if k not in expected and not is_ignored_key(k)]
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)} (in "
                        f"{sorted({source.file_of[k].name for k in unexpected})})")
    for spec in specs:
        if spec.hf_key not in have:
            continue
        shape, dtype = source.shape(spec.hf_key), source.dtype(spec.hf_key)
        if shape != spec.hf_shape:
            problems.append(f"{spec.hf_key!r} in {source.file_of[spec.hf_key].name} has shape "
                            f"{list(shape)}, the config wants {list(spec.hf_shape)}")
        if dtype not in _FLOAT_SOURCES:
            problems.append(f"{spec.hf_key!r} in {source.file_of[spec.hf_key].name} has dtype "
                            f"{dtype}, expected a float type")
    if problems:
        raise ValueError(f"{folder}: checkpoint does not match its config.json:\n  "
                         + "\n  ".join(problems))


def _set(tree: dict, path: ParamPath, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def convert_hf(folder: str | Path, dtype: DType = "float32",
               progress: bool = True) -> tuple[ModelConfig, dict]:
    """Read an HF LLaDA or Dream checkpoint folder into `(config, params)`.

    folder:   holds `config.json` and `model.safetensors` or sharded safetensors with
              `model.safetensors.index.json` (`pytorch_model*.bin` needs optional torch).
    dtype:    `"float32"` or `"bfloat16"` for every params array; values are rounded to
              nearest-even from the stored dtype (bf16 -> f32 is exact).
    progress: show a tqdm bar over the tensors.

    Raises `FileNotFoundError` / `ValueError` naming the file or key on a missing
    `config.json`, an unknown `model_type`, an unsupported option, missing or unexpected
    keys, wrong shapes, or an unreadable / truncated weights file.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    target = _DTYPES[dtype]
    folder = Path(folder)
    config = load_model_config(folder)
    specs = key_map(config)
    shapes = param_shapes(config)
    by_path: dict[ParamPath, list[TensorSpec]] = {}
    for spec in specs:
        by_path.setdefault(spec.path, []).append(spec)

    params: dict = {}
    with open_checkpoint(folder) as source:
        check_source(source, specs, folder)
        bar = tqdm(total=len(specs), desc=f"converting {folder.name}", unit="tensor",
                   disable=not progress)
        try:
            for path, group in by_path.items():
                host = np.empty(shapes[path], target)
                for spec in group:
                    tensor = source.read(spec.hf_key)
                    if tensor.shape != spec.hf_shape:  # the header said otherwise
                        raise CheckpointError(
                            f"{source.file_of[spec.hf_key]}: {spec.hf_key!r} read with shape "
                            f"{list(tensor.shape)}, header said {list(spec.hf_shape)}")
                    if spec.transpose:
                        tensor = tensor.T
                    if spec.layer is None:
                        host[...] = tensor.astype(target, copy=False)
                    else:
                        host[spec.layer] = tensor.astype(target, copy=False)
                    del tensor
                    bar.update(1)
                _set(params, path, jnp.asarray(host))
                del host
        finally:
            bar.close()
    return config, params
