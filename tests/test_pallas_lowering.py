"""Lowering smoke tests: export the Pallas kernels for CUDA (Triton) and TPU (Mosaic) on CPU.

`jax.export` runs the full Pallas -> Triton IR / Mosaic MLIR lowering (and MLIR verification,
e.g. Triton's power-of-two tensor sizes) without the target hardware. It does not run the
backend compilers (Triton -> PTX, Mosaic layout passes), so it cannot catch everything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from bicache_jax.pallas_kernels import BlockSizes, attention

try:
    from jax.sharding import AbstractDevice, AbstractMesh
except ImportError:  # pragma: no cover - older jax
    from jax._src.mesh import AbstractDevice, AbstractMesh

TRITON_CALL = "__gpu$xla.gpu.triton"

# jax 0.12 warns that the Pallas Triton backend is deprecated (in favour of Mosaic GPU).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def shape_structs(batch, q_len, heads, kv_heads, head_dim, cached, fresh, dtype):
    """ShapeDtypeStructs of (q, cached_k, cached_v, cached_len, fresh_k, fresh_v, fresh_len)."""
    def s(*shape, dt=dtype):
        return jax.ShapeDtypeStruct(shape, dt)

    kv_c = s(batch, cached, kv_heads, head_dim)
    kv_f = s(batch, fresh, kv_heads, head_dim)
    lens = s(batch, dt=jnp.int32)
    return (s(batch, q_len, heads, head_dim), kv_c, kv_c, lens, kv_f, kv_f, lens)


SHAPES = {
    # LLaDA-8B attention: Hq = Hkv = 32, D = 128 (default sizes pick 2 KV splits here).
    "llada_bf16": (2, 32, 32, 32, 128, 512, 32, jnp.bfloat16),
    "llada_long_bf16": (1, 32, 32, 32, 128, 8192, 32, jnp.bfloat16),
    "gqa_d64_bf16": (2, 32, 8, 2, 64, 512, 32, jnp.bfloat16),
    "gqa_d64_f32_odd": (2, 13, 4, 2, 64, 37, 13, jnp.float32),
    "no_cached_source": (2, 16, 4, 2, 64, 0, 16, jnp.bfloat16),
}


def _export_gpu(structs, block_sizes=None):
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu"))
    fn = jax.jit(lambda *a: attention(*a, backend="gpu", block_sizes=block_sizes))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.export.export(
            fn, platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*structs)


def _export_tpu(structs, block_sizes=None):
    fn = jax.jit(lambda *a: attention(*a, backend="tpu", block_sizes=block_sizes))
    return jax.export.export(fn, platforms=["tpu"])(*structs)


@pytest.mark.parametrize("name", list(SHAPES))
def test_export_triton_gpu(name):
    structs = shape_structs(*SHAPES[name])
    exported = _export_gpu(structs)
    text = exported.mlir_module()
    assert TRITON_CALL in text
    assert exported.out_avals[0].shape == structs[0].shape
    assert exported.out_avals[0].dtype == structs[0].dtype


@pytest.mark.parametrize("splits", [1, 4])
def test_export_triton_gpu_split_and_unsplit(splits):
    """Both the single-pass (normalise in kernel) and split-KV (merge in jnp) variants lower."""
    structs = shape_structs(*SHAPES["llada_bf16"])
    sizes = BlockSizes(block_q=32, block_k=64, num_kv_splits=splits, num_warps=4)
    assert TRITON_CALL in _export_gpu(structs, sizes).mlir_module()


@pytest.mark.parametrize("name", list(SHAPES))
def test_export_mosaic_tpu(name):
    structs = shape_structs(*SHAPES[name])
    exported = _export_tpu(structs)
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == structs[0].shape


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
def test_export_mosaic_tpu_targeted(device_kind):
    """Lowering with a concrete TPU generation (generation-dependent lowering rules)."""
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind=device_kind, num_cores=1, platform="tpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        for name in ("llada_bf16", "gqa_d64_f32_odd"):
            exported = _export_tpu(shape_structs(*SHAPES[name]))
            assert "tpu_custom_call" in exported.mlir_module()
