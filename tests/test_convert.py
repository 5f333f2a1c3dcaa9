"""HF -> bicache_jax conversion: configs, numerics against an independent numpy forward of
the HF architecture, dtypes, and errors on bad checkpoints."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from bicache_jax.convert import (
    convert_hf,
    hf_to_model_config,
    key_map,
    load_model_config,
    param_shapes,
)
from hf_fixtures import (
    BF16,
    DREAM_CONFIG,
    LLADA_CONFIG,
    dream_folder,
    dream_state,
    hf_forward,
    llada_folder,
    write_folder,
)

from bicache_jax.config import ModelConfig
from bicache_jax.model import forward
from bicache_jax.model import param_shapes as model_param_shapes

FOLDERS = {
    "llada": lambda p: llada_folder(p),
    "llada_gqa_bias_sharded": lambda p: llada_folder(
        p, shards=2, n_kv_heads=2, include_qkv_bias=True, embedding_size=64, vocab_size=64),
    "dream": lambda p: dream_folder(p),
    "dream_sharded": lambda p: dream_folder(p, shards=3, seed=1),
}


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def converted(request, tmp_path_factory):
    folder, cfg, state = FOLDERS[request.param](tmp_path_factory.mktemp(request.param))
    config, params = convert_hf(folder, progress=False)
    return folder, cfg, state, config, params


def test_config_translation():
    llada = hf_to_model_config(LLADA_CONFIG)
    assert llada == ModelConfig(
        layout="llada", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=4,
        head_dim=8, mlp_dim=48, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
        logits_shift=False, mask_token_id=59, max_seq_len=128)
    dream = hf_to_model_config(DREAM_CONFIG)
    assert dream == ModelConfig(
        layout="dream", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=8, mlp_dim=48, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
        logits_shift=True, mask_token_id=62, max_seq_len=256)


def test_real_model_configs_match_presets():
    """The 8B / 7B architecture values (as in the published config.json files) map onto the
    presets (max positions set to the presets' values)."""
    from bicache_jax.config import dream_7b, llada_8b

    llada = LLADA_CONFIG | dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
                                mlp_hidden_size=12288, vocab_size=126464,
                                embedding_size=126464, mask_token_id=126336,
                                max_sequence_length=4096, rope_theta=500000.0)
    assert hf_to_model_config(llada) == llada_8b()
    dream = DREAM_CONFIG | dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                num_hidden_layers=28, intermediate_size=18944,
                                vocab_size=152064, mask_token_id=151666,
                                max_position_embeddings=32768, rope_theta=1000000.0)
    assert hf_to_model_config(dream) == dream_7b()


def test_key_map_shapes_match_the_model(converted):
    *_, config, params = converted
    want = {tuple(k.key for k in path): leaf.shape for path, leaf in
            jax.tree_util.tree_leaves_with_path(model_param_shapes(config))}
    assert want == param_shapes(config)
    got = {tuple(k.key for k in path): leaf.shape for path, leaf in
           jax.tree_util.tree_leaves_with_path(params)}
    assert got == want
    assert len({s.hf_key for s in key_map(config)}) == len(key_map(config))


def test_logits_match_numpy_hf_forward(converted):
    _, cfg, state, config, params = converted
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (2, 9))
    ours = np.asarray(forward(params, config, jnp.asarray(tokens, jnp.int32)))
    ref = hf_forward(state, cfg, tokens)
    assert ours.shape == ref.shape == (2, 9, config.vocab_size)
    assert rel_err(ours, ref) <= 1e-5


def test_weights_land_where_expected(converted):
    _, cfg, state, config, params = converted
    if config.layout == "llada":
        wq = state["model.transformer.blocks.1.q_proj.weight"]
        head = state["model.transformer.ff_out.weight"]
        norm = state["model.transformer.blocks.2.ff_norm.weight"]
    else:
        wq = state["model.layers.1.self_attn.q_proj.weight"]
        head = state["lm_head.weight"]
        norm = state["model.layers.1.post_attention_layernorm.weight"]
    np.testing.assert_array_equal(params["layers"]["wq"][1], wq.T)
    np.testing.assert_array_equal(params["lm_head"], head.T)
    np.testing.assert_array_equal(params["layers"]["mlp_norm"][-1], norm)


def test_bfloat16_is_the_rounded_float32(converted):
    folder, _, _, config, params32 = converted
    config16, params16 = convert_hf(folder, dtype="bfloat16", progress=False)
    assert config16 == config
    for a, b in zip(jax.tree.leaves(params32), jax.tree.leaves(params16), strict=True):
        assert b.dtype == jnp.bfloat16
        want = np.asarray(a.astype(jnp.bfloat16)).view(np.uint16)
        np.testing.assert_array_equal(np.asarray(b).view(np.uint16), want)


def test_bfloat16_source_converts_exactly(tmp_path):
    folder, _, state = dream_folder(tmp_path, dtype=BF16)
    _, p32 = convert_hf(folder, dtype="float32", progress=False)
    _, p16 = convert_hf(folder, dtype="bfloat16", progress=False)
    emb = state["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(p32["embed"]), emb.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(p16["embed"]).view(np.uint16), emb.view(np.uint16))


def test_ignores_rotary_buffers_and_shows_progress(tmp_path, capsys):
    state = dream_state(DREAM_CONFIG)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    write_folder(tmp_path, DREAM_CONFIG, state)
    convert_hf(tmp_path, progress=True)
    assert "tensor" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors


def _rewrite_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(cfg))


def _resave(folder, mutate):
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    mutate(state)
    save_file(state, str(path))


def test_missing_key(tmp_path):
    folder, *_ = llada_folder(tmp_path)
    _resave(folder, lambda s: s.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys: 'model.transformer.blocks.1.up_proj"):
        convert_hf(folder, progress=False)


def test_unexpected_key(tmp_path):
    folder, *_ = dream_folder(tmp_path)
    _resave(folder, lambda s: s.update({"model.layers.0.self_attn.o_proj.bias":
                                        np.zeros(32, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected keys: 'model.layers.0.self_attn.o_proj.bias'"
                                         r".*model.safetensors"):
        convert_hf(folder, progress=False)


def test_wrong_shape(tmp_path):
    folder, *_ = dream_folder(tmp_path)
    _resave(folder, lambda s: s.update({"model.layers.1.mlp.up_proj.weight":
                                        np.zeros((40, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' in "
                                         r"model.safetensors has shape \[40, 32\], the config "
                                         r"wants \[48, 32\]"):
        convert_hf(folder, progress=False)


def test_config_problems(tmp_path):
    folder, *_ = llada_folder(tmp_path)
    _rewrite_config(folder, model_type="llama")
    with pytest.raises(ValueError, match=r"config.json: unknown model_type 'llama'"):
        convert_hf(folder, progress=False)
    _rewrite_config(folder, model_type="llada", weight_tying=True)
    with pytest.raises(ValueError, match=r"config.json: unsupported weight_tying=True"):
        convert_hf(folder, progress=False)
    _rewrite_config(folder, weight_tying=False, include_bias=True)
    with pytest.raises(ValueError, match=r"unsupported include_bias=True"):
        convert_hf(folder, progress=False)
    _rewrite_config(folder, include_bias=False, embedding_size=32)
    with pytest.raises(ValueError, match=r"embedding_size 32 is smaller than vocab_size 60"):
        load_model_config(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json"):
        convert_hf(folder, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    folder, *_ = dream_folder(tmp_path, shards=2)
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100] if damage == "truncated" else b"\x07" * 64)
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        convert_hf(folder, progress=False)


def test_index_pointing_at_missing_shard(tmp_path):
    folder, *_ = llada_folder(tmp_path, shards=3)
    (folder / "model-00003-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model.safetensors.index.json.*"
                                         r"model-00003-of-00003.safetensors"):
        convert_hf(folder, progress=False)


def test_index_disagreeing_with_shards(tmp_path):
    folder, *_ = llada_folder(tmp_path, shards=2)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.transformer.wte.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"index.json: lists 'model.transformer.wte.weight'"):
        convert_hf(folder, progress=False)


def test_no_weights_or_torch_only(tmp_path):
    folder, *_ = llada_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights found"):
        convert_hf(folder, progress=False)
    try:
        import torch  # noqa: F401
    except ImportError:
        (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
        with pytest.raises(ValueError, match=r"pytorch_model.bin: .*needs PyTorch"):
            convert_hf(folder, progress=False)


def test_config_defaults_follow_the_hf_classes():
    llada = {k: v for k, v in LLADA_CONFIG.items()
             if k not in ("n_kv_heads", "mlp_hidden_size", "embedding_size")}
    c = hf_to_model_config(llada | {"mlp_ratio": 2})
    # LLaDA's ModelConfig defaults embedding_size to 50304 (HF would build that many rows).
    assert (c.n_kv_heads, c.mlp_dim, c.vocab_size) == (4, 64, 50304)
    with pytest.raises(ValueError, match=r"config.json: unsupported weight_tying=True"):
        hf_to_model_config({k: v for k, v in llada.items() if k != "weight_tying"})
    with pytest.raises(ValueError, match=r"x.json: required field 'd_model' is missing"):
        hf_to_model_config({k: v for k, v in llada.items() if k != "d_model"}, "x.json")
    with pytest.raises(ValueError, match=r"x.json: head_dim must be even"):
        hf_to_model_config(LLADA_CONFIG | {"d_model": 36, "n_heads": 12, "n_kv_heads": 12},
                           "x.json")
    dream = {k: v for k, v in DREAM_CONFIG.items() if k != "num_key_value_heads"}
    with pytest.raises(ValueError, match=r"4 attention heads are not a multiple of the 32"):
        hf_to_model_config(dream)  # DreamConfig's default is 32 key/value heads
    assert hf_to_model_config(dream | {"num_key_value_heads": None}).n_kv_heads == 4
    with pytest.raises(ValueError, match=r"mask_token_id must be a token id below 64"):
        hf_to_model_config(DREAM_CONFIG | {"mask_token_id": 64})
    with pytest.raises(ValueError, match=r"unsupported rope_scaling"):
        hf_to_model_config(DREAM_CONFIG | {"rope_scaling": {"type": "yarn", "factor": 4.0}})
