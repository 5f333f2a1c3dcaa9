"""Save / restore converted models, and load either an HF folder or our checkpoint.

A bicache_jax checkpoint is a directory:

    params/                  the params pytree, written by orbax (StandardCheckpointer)
    config.json              our `ModelConfig` as JSON (`ModelConfig.to_json`)
    bicache_table.json       optional: the profiler's r -> b table (a plain `{r: b}` table
                             or a whole `ProfileResult` JSON with per-layer scores)
    bicache_checkpoint.json  marker {"format": "bicache_jax", "version": 1}, written last

`save` writes everything into a temporary sibling directory and renames it into place
only once complete, so a failure at any point leaves no directory at `path` (and no
temporary one either): anything carrying the marker is a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .convert.convert import DType, convert_hf
from .convert.hf_config import read_hf_config
from .convert.key_maps import check_params
from .profiler import parse_table

MARKER_FILE = "bicache_checkpoint.json"
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
TABLE_FILE = "bicache_table.json"
FORMAT = "bicache_jax"
VERSION = 1

Params = dict
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The model `bicache-jax` commands use when no --model is given.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_model"


class LoadedModel(NamedTuple):
    """What `load` and `restore` return; unpacks as `params, config, depth_table`."""

    params: Params
    config: ModelConfig
    depth_table: dict[int, int] | None  # the profiler's r -> b table, None if never profiled


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


def _ocp():
    import orbax.checkpoint as ocp  # heavy import, only when a checkpoint is touched

    return ocp


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a complete bicache_jax checkpoint (it carries the marker file)."""
    return (Path(path) / MARKER_FILE).is_file()


def save(path: str | Path, params: Params, config: ModelConfig,
         profile_table: Any = None, *, overwrite: bool = False) -> Path:
    """Write `params`, `config` and an optional `profile_table` to directory `path`.

    `profile_table` is the profiler's `r -> b` table, plain or as a whole profile result
    (`json.loads(ProfileResult.to_json())`, kept with its scores); see
    `profiler.parse_table`.

    Atomic: the checkpoint is assembled in a temporary sibling directory and renamed
    into place when complete; on any error (Ctrl-C included) nothing is left behind, and
    the leftovers of a process killed while saving are removed first (`remove_partial`).
    An existing `path` raises `FileExistsError` unless `overwrite=True` (then it is
    replaced as a whole only after the new checkpoint is complete). Returns the absolute
    path.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    check_params(params, config, str(path))
    table_text = None
    if profile_table is not None:
        try:
            parse_table(profile_table)
            table_text = json.dumps(profile_table, indent=1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path / TABLE_FILE}: profile_table is not a reuse table: "
                             f"{e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_partial(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        ocp = _ocp()
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(config.to_json() + "\n", encoding="utf-8")
        if table_text is not None:
            (tmp / TABLE_FILE).write_text(table_text + "\n", encoding="utf-8")
        (tmp / MARKER_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION}) + "\n",
                                       encoding="utf-8")
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_partial(path: str | Path) -> list[Path]:
    """Remove the hidden `.NAME.tmp-*` folders beside `path` that a killed `save` left
    behind (a save removes its own unless the process dies first); returns them. Two
    processes must not save to the same path at once. (A `.NAME.old-*` folder is kept: a
    save killed while swapping an overwritten checkpoint leaves the old one there.)"""
    path = Path(path).absolute()
    stale = sorted(path.parent.glob(f".{path.name}.tmp-*"))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    if not overwrite:
        raise FileExistsError(f"{path}: appeared while saving; not replaced")
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _is_array_meta(m: Any) -> bool:
    return hasattr(m, "shape") and hasattr(m, "dtype")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from e


def _array_metadata(ckptr: Any, params_dir: Path) -> Any:
    meta = ckptr.metadata(params_dir)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def restore(path: str | Path, dtype: DType | Any = None) -> LoadedModel:
    """Read a checkpoint written by `save`: `(params, config, depth_table or None)`.

    `dtype` (None, "float32", "bfloat16" or a jnp dtype) casts every array; None keeps the
    stored dtypes, bit for bit. Arrays land on the default device. Errors name the file.
    """
    path = Path(path).absolute()
    marker_path = path / MARKER_FILE
    if not marker_path.is_file():
        raise ValueError(f"{path}: not a bicache_jax checkpoint (no {MARKER_FILE})")
    marker = _read_json(marker_path)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise ValueError(f"{marker_path}: not a {FORMAT} marker: {marker!r}")
    if marker.get("version") != VERSION:
        raise ValueError(f"{marker_path}: unsupported checkpoint version "
                         f"{marker.get('version')!r} (this code reads {VERSION})")
    config_path = path / CONFIG_FILE
    try:
        config = ModelConfig.from_json(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{config_path}: missing") from e
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{config_path}: not a valid ModelConfig: {e}") from e
    table = _read_table(path)
    params_dir = path / PARAMS_DIR
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: missing")
    cast = _resolve_dtype(dtype)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    ocp = _ocp()
    with ocp.StandardCheckpointer() as ckptr:
        try:
            meta = _array_metadata(ckptr, params_dir)
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                meta, is_leaf=_is_array_meta)
        except Exception as e:  # orbax / tensorstore raise many types
            raise ValueError(f"{params_dir}: cannot read the params metadata (corrupt or "
                             f"incomplete checkpoint?): {_root_cause(e)}") from e
        if not hasattr(target, "items") or not target:  # orbax may only log the failure
            raise ValueError(f"{params_dir}: cannot read the params metadata (corrupt or "
                             f"incomplete checkpoint?)")
        check_params(target, config, str(params_dir))
        try:
            params = ckptr.restore(params_dir, target)
        except Exception as e:
            raise ValueError(f"{params_dir}: cannot restore params (corrupt or incomplete "
                             f"checkpoint?): {_root_cause(e)}") from e
    params = _plain(params)
    if cast is not None:
        params = jax.tree.map(lambda x: x.astype(cast), params)
    return LoadedModel(params, config, table)


def _read_table(folder: Path) -> dict[int, int] | None:
    """The r -> b table `bicache-jax profile` wrote into `folder`, or None."""
    table_path = folder / TABLE_FILE
    if not table_path.is_file():
        return None
    try:
        return parse_table(_read_json(table_path))
    except ValueError as e:
        raise ValueError(f"{table_path}: {e}") from e


def _root_cause(error: BaseException) -> str:
    """One line for an orbax / TensorStore failure: the innermost error of the chain (the
    outer ones wrap it in a multi-line dump of the TensorStore spec)."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].split(" See full TensorStore details")[0]


def _plain(tree: Any) -> Any:
    """Nested plain dicts (orbax may hand back other mapping types)."""
    if hasattr(tree, "items"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def load(path: str | Path, dtype: DType | Any = None, progress: bool = True) -> LoadedModel:
    """Load a model from a bicache_jax checkpoint or an HF checkpoint folder.

    A directory with the marker file is restored with `restore` (dtype None keeps the
    stored dtypes). A directory whose `config.json` has a `model_type` is converted with
    `convert_hf` (dtype None means "float32"). Either way the depth table is the
    `bicache_table.json` that `bicache-jax profile --model PATH` wrote into the folder
    (None until the model is profiled). Returns `LoadedModel(params, config,
    depth_table)`, which unpacks as a 3-tuple.
    """
    path = Path(path)
    if is_checkpoint(path):
        return restore(path, dtype)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: missing; {path} is neither an HF checkpoint folder nor a "
            f"bicache_jax checkpoint (no {MARKER_FILE})")
    hf = read_hf_config(path)
    if "model_type" not in hf:
        raise ValueError(
            f"{config_path}: has no 'model_type' and {path} has no {MARKER_FILE}: neither an "
            "HF checkpoint folder nor a complete bicache_jax checkpoint")
    if dtype is None:
        dtype = "float32"
    elif not isinstance(dtype, str):
        dtype = {jnp.dtype(jnp.float32): "float32",
                 jnp.dtype(jnp.bfloat16): "bfloat16"}.get(jnp.dtype(dtype), str(dtype))
    table = _read_table(path)  # before the (long) conversion: a bad table fails fast
    config, params = convert_hf(path, dtype=dtype, progress=progress)
    return LoadedModel(params, config, table)


def load_model(path: str | Path | None = None, dtype: DType | Any = None,
               progress: bool = True) -> tuple[Params, ModelConfig, dict[int, int] | None,
                                               Any | None]:
    """`load` plus the folder's tokenizer: `(params, config, depth_table, Tokenizer or
    None)`; `path` None is `DEFAULT_MODEL`. What the command line and the harness load."""
    path = Path(path) if path else DEFAULT_MODEL
    if not path.exists():
        raise FileNotFoundError(f"no model at {path} (pass --model PATH: an HF folder or a "
                                f"checkpoint written by `bicache-jax convert`)")
    params, config, table = load(path, dtype, progress)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(path)
    return params, config, table, tokenizer


def convert_checkpoint(hf_folder: str | Path, path: str | Path, dtype: DType = "bfloat16",
                       profile_table: Any = None, *, progress: bool = True,
                       overwrite: bool = False) -> ModelConfig:
    """Convert an HF folder and `save` it at `path` in one go; returns the config.

    Any failure (bad checkpoint, full disk, ...) leaves nothing at `path`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    config, params = convert_hf(hf_folder, dtype=dtype, progress=progress)
    save(path, params, config, profile_table, overwrite=overwrite)
    return config
