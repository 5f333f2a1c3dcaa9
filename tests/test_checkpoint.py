"""Orbax checkpoints: bit-exact round trips, atomic saves, `load` of either format, and
no half-written checkpoint whatever goes wrong."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bicache_jax.convert import convert_hf, param_shapes
from hf_fixtures import dream_folder, llada_folder

from bicache_jax import checkpoint
from bicache_jax.config import ModelConfig, tiny_dream

TABLE = {10: 0, 45: 2, 80: 3}  # the profiler's r -> b staircase


def init_params(config, key, dtype=jnp.float32):
    """Random params of `config` (numpy; much faster than the model's flax init)."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    params: dict = {}
    for path, shape in param_shapes(config).items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(rng.standard_normal(shape), dtype)
    return params


def bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(bits(x), bits(y))


def only_entry(parent):
    """Everything in `parent` (to prove no temporary directory was left behind)."""
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def hf_llada(tmp_path_factory):
    return llada_folder(tmp_path_factory.mktemp("hf") / "llada")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    config = tiny_dream()
    params = init_params(config, jax.random.key(0), dtype)
    path = checkpoint.save(tmp_path / "ckpt", params, config, TABLE)
    assert only_entry(tmp_path) == ["ckpt"]
    assert checkpoint.is_checkpoint(path)
    params2, config2, table2 = checkpoint.restore(path)
    assert config2 == config and table2 == TABLE
    assert isinstance(params2, dict) and isinstance(params2["layers"], dict)
    assert_bit_equal(params, params2)
    loaded, config3, table3 = checkpoint.load(tmp_path / "ckpt")
    assert config3 == config and table3 == TABLE
    assert_bit_equal(params, loaded)


def test_restore_casts_exactly_and_no_table(tmp_path):
    config = tiny_dream().replace(attention_impl="xla")
    params = init_params(config, jax.random.key(1))
    checkpoint.save(tmp_path / "c", params, config)
    p16, config2, table = checkpoint.restore(tmp_path / "c", dtype="bfloat16")
    assert table is None and config2 == config
    assert_bit_equal(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), p16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        checkpoint.restore(tmp_path / "c", dtype="float8")


def test_load_hf_folder_and_converted_checkpoint(tmp_path, hf_llada):
    folder, *_ = hf_llada
    config, params = convert_hf(folder, dtype="bfloat16", progress=False)
    loaded, config2, table = checkpoint.load(folder, dtype="bfloat16", progress=False)
    assert config2 == config and table is None
    assert_bit_equal(params, loaded)
    loaded32, _, _ = checkpoint.load(folder, progress=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded32))

    out = tmp_path / "converted"
    assert checkpoint.convert_checkpoint(folder, out, "bfloat16", TABLE, progress=False) == config
    restored, config3, table3 = checkpoint.load(out)
    assert config3 == config and table3 == TABLE
    assert_bit_equal(params, restored)


def test_existing_path_and_overwrite(tmp_path):
    config = tiny_dream()
    p1 = init_params(config, jax.random.key(1))
    p2 = init_params(config, jax.random.key(2))
    path = checkpoint.save(tmp_path / "c", p1, config)
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save(path, p2, config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError, match="empty: already exists"):
        checkpoint.save(tmp_path / "empty", p2, config)
    # A whole profile result (JSON keys are strings) is kept; restore returns its table.
    result = {"threshold": 0.9, "table": {"20": 1, "60": 2}, "scores": {"20": [0.99, 0.5]}}
    checkpoint.save(path, p2, config, result, overwrite=True)
    restored, _, table = checkpoint.restore(path)
    assert table == {20: 1, 60: 2}
    assert json.loads((path / checkpoint.TABLE_FILE).read_text()) == result
    assert_bit_equal(p2, restored)
    assert only_entry(tmp_path) == ["c", "empty"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    config = tiny_dream()
    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match=r"bicache_table.json: profile_table is not a reuse"):
        checkpoint.save(tmp_path / "a", params, config, {"x": object()})
    with pytest.raises(ValueError, match=r"bicache_table.json: profile_table is not a reuse"):
        checkpoint.save(tmp_path / "a", params, config, {"150": 2})
    wrong = tiny_dream().replace(mlp_dim=40)
    with pytest.raises(ValueError, match=r"w_gate has shape \[3, 32, 48\], the config wants "
                                         r"\[3, 32, 40\]"):
        checkpoint.save(tmp_path / "a", params, wrong)
    bad = dict(params, extra=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"unexpected arrays \['extra'\]"):
        checkpoint.save(tmp_path / "a", bad, config)

    def boom(self):  # fails after orbax has written the params
        raise OSError("disk full")

    monkeypatch.setattr(ModelConfig, "to_json", boom)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path / "a", params, config)
    assert only_entry(tmp_path) == []


def _drop_key(folder):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state.pop("model.transformer.blocks.0.attn_out.weight")
    save_file(state, str(folder / "model.safetensors"))


def _add_key(folder):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["model.transformer.blocks.0.attn_out.bias"] = np.zeros(32, np.float32)
    save_file(state, str(folder / "model.safetensors"))


def _bad_shape(folder):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["model.transformer.wte.weight"] = np.zeros((64, 30), np.float32)
    save_file(state, str(folder / "model.safetensors"))


def _model_type(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"model_type": "mistral"}))


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


DAMAGE = {
    "missing_key": (_drop_key, "blocks.0.attn_out.weight"),
    "unexpected_key": (_add_key, "blocks.0.attn_out.bias"),
    "wrong_shape": (_bad_shape, r"model.transformer.wte.weight' in model.safetensors has shape"),
    "unknown_model_type": (_model_type, r"config.json: unknown model_type 'mistral'"),
    "truncated": (_truncate, r"model.safetensors: not a readable safetensors file"),
    "no_config": (lambda f: (f / "config.json").unlink(), r"config.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_bad_hf_input_leaves_no_checkpoint(tmp_path, hf_llada, damage):
    folder = tmp_path / "hf"
    shutil.copytree(hf_llada[0], folder)
    mutate, message = DAMAGE[damage]
    mutate(folder)
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        checkpoint.convert_checkpoint(folder, out, progress=False)
    assert only_entry(tmp_path) == ["hf"]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        checkpoint.load(folder, progress=False)


def test_missing_shard_leaves_no_checkpoint(tmp_path):
    folder, *_ = dream_folder(tmp_path / "hf", shards=2)
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match=r"index.json: points at shard "
                                         r"'model-00001-of-00002.safetensors'"):
        checkpoint.convert_checkpoint(folder, tmp_path / "out", progress=False)
    assert only_entry(tmp_path) == ["hf"]


def test_restore_and_load_errors_name_the_file(tmp_path):
    config = tiny_dream()
    path = checkpoint.save(tmp_path / "c", init_params(config, jax.random.key(0)), config)
    with pytest.raises(FileNotFoundError, match=r"nothing: no such directory"):
        checkpoint.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json: missing"):
        checkpoint.load(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty: not a bicache_jax checkpoint"):
        checkpoint.restore(tmp_path / "empty")

    partial = tmp_path / "partial"  # our files without the marker: never written by save
    shutil.copytree(path, partial)
    (partial / checkpoint.MARKER_FILE).unlink()
    with pytest.raises(ValueError, match=r"partial/config.json: has no 'model_type'"):
        checkpoint.load(partial)

    (path / checkpoint.TABLE_FILE).write_text('{"table": {"30": "deep"}}')
    with pytest.raises(ValueError, match=r"c/bicache_table.json: reuse table entry '30'"):
        checkpoint.restore(path)
    (path / checkpoint.TABLE_FILE).unlink()

    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"c/config.json: not a valid ModelConfig"):
        checkpoint.restore(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"c/config.json: missing"):
        checkpoint.restore(path)
    (path / "config.json").write_text(tiny_dream().replace(d_model=64).to_json())
    with pytest.raises(ValueError, match=r"c/params: params do not match the config"):
        checkpoint.restore(path)
    shutil.rmtree(path / "params")
    (path / "config.json").write_text(config.to_json())
    with pytest.raises(FileNotFoundError, match=r"c/params: missing"):
        checkpoint.restore(path)
    (path / checkpoint.MARKER_FILE).write_text(json.dumps({"format": "bicache_jax",
                                                           "version": 99}))
    with pytest.raises(ValueError, match=r"bicache_checkpoint.json: unsupported checkpoint"):
        checkpoint.restore(path)
