"""Stream tensors one at a time out of an HF checkpoint folder.

Supported layouts, looked for in this order:

1. `model.safetensors.index.json` + the shards its `weight_map` names;
2. a single `model.safetensors`;
3. `pytorch_model.bin.index.json` + shards, or a single `pytorch_model.bin` — only when
   `torch` is installed (it is an optional dependency used for nothing else).

Headers (key, shape, dtype) are read up front so that a converter can check a whole
checkpoint before reading any data; `read(key)` then returns one tensor as a numpy array
in its stored dtype (`bfloat16` via `ml_dtypes`). Errors name the offending file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent (the message names it)."""


class TensorSource:
    """Random access to the tensors of one checkpoint, one tensor in memory at a time.

    Use as a context manager (or call `close`). `file_of[key]` is the file holding `key`.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}

    def keys(self) -> list[str]:
        """All tensor keys, in file order."""
        return list(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of `key` (from the header, no data read)."""
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        """Stored dtype of `key` as a safetensors dtype name (`F32`, `BF16`, ...)."""
        return self._dtypes[key]

    def read(self, key: str) -> np.ndarray:
        """The tensor `key` as a numpy array in its stored dtype."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)


def _read_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the shard index: {e}") from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: no 'weight_map' of tensor name -> shard file")
    return weight_map


def _shards(folder: Path, index: Path) -> tuple[dict[str, str], list[Path]]:
    weight_map = _read_index(index)
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = folder / name
        if Path(name).name != name:
            raise CheckpointError(f"{index}: shard name {name!r} is not a plain file name")
        if not shard.is_file():
            raise CheckpointError(f"{index}: points at shard {name!r}, but {shard} is missing")
        shards.append(shard)
    return weight_map, shards


class SafetensorsSource(TensorSource):
    """Tensors of `model.safetensors` or of the shards of `model.safetensors.index.json`."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        super().__init__(folder)
        self._error = SafetensorError
        self._handles: dict[Path, Any] = {}
        index = folder / SAFETENSORS_INDEX
        weight_map: dict[str, str] | None = None
        if index.is_file():
            weight_map, files = _shards(folder, index)
        else:
            files = [folder / SAFETENSORS_FILE]
        try:
            for path in files:
                try:
                    handle = safe_open(str(path), framework="numpy")
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(
                        f"{path}: not a readable safetensors file (truncated or corrupt?): "
                        f"{e}") from e
                self._handles[path] = handle
                for key in handle.keys():
                    if key in self.file_of:
                        raise CheckpointError(
                            f"{path}: tensor {key!r} is also in {self.file_of[key]}")
                    sl = handle.get_slice(key)
                    self.file_of[key] = path
                    self._shapes[key] = tuple(int(n) for n in sl.get_shape())
                    self._dtypes[key] = str(sl.get_dtype())
            if weight_map is not None:
                self._check_index(index, weight_map)
        except BaseException:
            self.close()
            raise

    def _check_index(self, index: Path, weight_map: dict[str, str]) -> None:
        for key, name in weight_map.items():
            where = self.file_of.get(key)
            if where is None or where.name != name:
                found = f"it is in {where.name}" if where is not None else "no shard has it"
                raise CheckpointError(
                    f"{index}: lists {key!r} in shard {name!r}, but {found}")
        extra = [k for k in self.file_of if k not in weight_map]
        if extra:
            raise CheckpointError(
                f"{self.file_of[extra[0]]}: holds tensors the index {index.name} does not "
                f"list: {extra[:10]}")

    def read(self, key: str) -> np.ndarray:
        path = self.file_of[key]
        try:
            return np.asarray(self._handles[path].get_tensor(key))
        except (self._error, OSError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}: {e}") from e

    def close(self) -> None:
        for handle in self._handles.values():
            # `safe_open` objects release their mapping when exited or collected.
            exit_ = getattr(handle, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
        self._handles.clear()


class TorchSource(TensorSource):
    """Tensors of `pytorch_model.bin` (or its shards); needs the optional `torch`."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        index = folder / TORCH_INDEX
        files = _shards(folder, index)[1] if index.is_file() else [folder / TORCH_FILE]
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{files[0]}: reading pytorch_model*.bin checkpoints needs PyTorch, which is "
                "not installed (pip install torch), or convert the folder to safetensors "
                "first") from e
        self._torch = torch
        self._state: dict[str, Any] = {}
        for path in files:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from e
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a state dict, got {type(state)}")
            for key, tensor in state.items():
                if key in self.file_of:
                    raise CheckpointError(f"{path}: tensor {key!r} is also in "
                                          f"{self.file_of[key]}")
                self.file_of[key] = path
                self._shapes[key] = tuple(int(n) for n in tensor.shape)
                self._dtypes[key] = _TORCH_DTYPES.get(str(tensor.dtype), str(tensor.dtype))
                self._state[key] = tensor

    def read(self, key: str) -> np.ndarray:
        tensor = self._state[key].detach().contiguous()
        if tensor.dtype == self._torch.bfloat16:
            import ml_dtypes

            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def close(self) -> None:
        self._state.clear()


_TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                 "torch.float64": "F64"}


def open_checkpoint(folder: str | Path) -> TensorSource:
    """Open the weights of an HF checkpoint folder (see the module docstring for layouts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS_FILE).is_file():
        return SafetensorsSource(folder)
    if (folder / TORCH_INDEX).is_file() or (folder / TORCH_FILE).is_file():
        return TorchSource(folder)
    raise CheckpointError(
        f"{folder}: no weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_FILE}, "
        f"{TORCH_INDEX}, {TORCH_FILE})")
