"""Sharded generate on 8 forced host devices equals single-device generate, every policy.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before jax initialises,
so the checks run in child processes: this file run as a script (`python
tests/test_sharding.py OUT.json POLICY,POLICY [--pallas]`) runs the given policies
single-device and on every mesh and writes tokens and sharding facts as JSON; the tests
below compare them. The policies are split over two children run side by side (XLA
compiles a program on one core, and the compiles dominate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
GEN = dict(gen_length=16, steps=8, block_length=8)


# ----------------------------------------------------------------------------- child


def _child(out_path: str, policies: list[str], check_pallas: bool) -> None:
    # 8 host devices; LLVM at -O0 halves XLA's CPU compile time (both sides of every
    # comparison are compiled alike).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8"
                               + " --xla_backend_optimization_level=0")
    sys.path.insert(0, str(Path(__file__).parent))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from bicache_jax.pallas_kernels import attention_reference
    from numpy_reference import sharp_params

    from bicache_jax import config as C
    from bicache_jax import sharding as S
    from bicache_jax.generate import Prompt, generate
    from bicache_jax.serving import Engine, Request

    assert jax.device_count() == 8, jax.devices()
    # 8 query heads (split on every model axis size), 2 KV heads (split only on 2): GQA.
    cfg = C.tiny_llada(n_kv_heads=2).replace(n_heads=8, head_dim=4,
                                              attention_impl="reference")
    params = sharp_params(cfg, seed=3)
    rng = np.random.default_rng(7)

    def ids(n):
        return tuple(int(i) for i in rng.integers(0, cfg.mask_token_id - 1, n))

    shared = ids(21)
    # 4 requests: two prefixes and one without (on data=8 the batch is padded to 8).
    prompts = [Prompt(prompt=ids(5), prefix=shared), Prompt(prompt=ids(3), prefix=shared[:13]),
               Prompt(prompt=ids(9), prefix=shared), Prompt(prompt=ids(7))]

    def kw(policy):
        return dict(config=cfg, policy=policy, reuse_depth=1 if "bicache" in policy else None,
                    **GEN)

    def record(out):
        return {"tokens": out.tokens.tolist(), "nfe": out.nfe.tolist(),
                "store_len": None if out.cache is None else len(out.cache)}

    result: dict = {"runs": {"single": {p: record(generate(params, prompts, None, **kw(p)))
                                        for p in policies}},
                    "meshes": {}}
    for data, model in MESHES:
        name = f"{data}x{model}"
        mesh = S.make_mesh(data, model)
        sp = S.shard_params(params, cfg, mesh)
        result["runs"][name] = {
            p: record(S.generate_sharded(sp, prompts, None, mesh=mesh, **kw(p)))
            for p in policies}
        if "none" in policies:  # the serving engine on the mesh (buckets: data multiples)
            engine = Engine(sp, cfg, mesh=mesh, buckets=(1, 2, 4))
            served = engine.run([Request(prompt=p.prefix + p.prompt, **GEN) for p in prompts])
            result["runs"][name]["engine_none"] = {
                "tokens": [r.tokens.tolist() for r in served], "buckets": engine.buckets,
                "ok": all(r.ok for r in served)}
        layers = sp["layers"]
        own = np.zeros((8, 32), np.int32)
        # One shared prefix entry (S = 1) read by all 8 requests through the index.
        placed = S.shard_inputs(mesh, cfg, own, own, np.zeros(8, np.int32),
                                jnp.zeros((cfg.n_layers, 1, 16, cfg.n_kv_heads,
                                           cfg.head_dim)), None, np.zeros(8, np.int32))
        info = {
            "specs": {n: list(layers[n].sharding.spec)
                      for n in ("wq", "wk", "wo", "w_gate", "w_down")},
            "devices": {n: len(layers[n].sharding.device_set)
                        for n in ("wq", "wk", "wo", "w_gate", "w_down")},
            "shard_shape_wq": list(layers["wq"].addressable_shards[0].data.shape),
            "embed_spec": list(sp["embed"].sharding.spec),
            "lm_head_spec": list(sp["lm_head"].sharding.spec),
            "input_specs": [list(placed[0].sharding.spec), list(placed[3].sharding.spec),
                            list(placed[5].sharding.spec)],
            "input_shard_rows": placed[0].addressable_shards[0].data.shape[0],
        }
        if check_pallas:  # the shard_map-wrapped Pallas kernel (interpret mode) vs reference
            k = jax.random.split(jax.random.key(data), 5)
            q = jax.random.normal(k[0], (8, 8, cfg.n_heads, cfg.head_dim))
            ck, cv = (jax.random.normal(x, (8, 16, cfg.n_kv_heads, cfg.head_dim))
                      for x in k[1:3])
            fk, fv = (jax.random.normal(x, (8, 8, cfg.n_kv_heads, cfg.head_dim))
                      for x in k[3:5])
            cl, fl = jnp.arange(8) * 2, jnp.full((8,), 8)
            with jax.set_mesh(mesh):
                got = jax.jit(lambda *a, m=mesh: S.pallas_attention_sharded(m, *a))(
                    q, ck, cv, cl, fk, fv, fl)
            ref = attention_reference(q, ck, cv, cl, fk, fv, fl)
            info["pallas_max_err"] = float(jnp.max(jnp.abs(got - ref)))
        result["meshes"][name] = info
    Path(out_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    """Run the children (policies split over two processes: XLA compiles on one core)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bicache_jax.policies import POLICIES

    policies = sorted(POLICIES)
    groups = [policies[0::2], policies[1::2]]
    tmp = tmp_path_factory.mktemp("sharding")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    procs = []
    for i, group in enumerate(groups):
        out = tmp / f"result{i}.json"
        cmd = [sys.executable, __file__, str(out), ",".join(group)] + (["--pallas"] * (i == 1))
        procs.append((out, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True)))
    merged: dict = {"policies": policies, "runs": {}, "meshes": {}}
    for out, proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        part = json.loads(out.read_text())
        for run, by_policy in part["runs"].items():
            merged["runs"].setdefault(run, {}).update(by_policy)
        for name, info in part["meshes"].items():
            merged["meshes"].setdefault(name, {}).update(info)
    return merged


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES])
def test_sharded_generate_equals_single_device_for_every_policy(findings, mesh):
    single, sharded = findings["runs"]["single"], findings["runs"][mesh]
    assert len({tuple(t) for t in single["none"]["tokens"]}) > 1, "degenerate model"
    engine = sharded.pop("engine_none")
    assert engine["ok"] and engine["tokens"] == single["none"]["tokens"]
    assert all(b % int(mesh.split("x")[0]) == 0 for b in engine["buckets"])
    assert sorted(sharded) == findings["policies"]
    mismatched = [p for p in findings["policies"]
                  if sharded[p]["tokens"] != single[p]["tokens"]]
    assert not mismatched, f"tokens differ on {mesh} for {mismatched}"
    for p in findings["policies"]:
        assert sharded[p]["nfe"] == single[p]["nfe"], p
        assert sharded[p]["store_len"] == single[p]["store_len"], p
    for p in ("naive_prefix", "bicache", "bicache_dual"):
        assert sharded[p]["store_len"] == 2  # two distinct prefixes, each stored once


@pytest.mark.parametrize("data,model", MESHES)
def test_params_and_inputs_are_really_sharded(findings, data, model):
    info = findings["meshes"][f"{data}x{model}"]
    assert info["specs"]["wq"] == [None, None, "model"]
    assert info["specs"]["wo"] == [None, "model", None]
    assert info["specs"]["w_gate"] == [None, None, "model"]
    assert info["specs"]["w_down"] == [None, "model", None]
    # 2 KV heads: split on a model axis of 1 or 2, replicated on 4 and 8.
    assert info["specs"]["wk"] == ([None, None, "model"] if model <= 2 else [None] * 3)
    assert info["devices"]["wq"] == 8
    assert info["shard_shape_wq"] == [3, 32, 32 // model]
    assert info["embed_spec"] == [None, "model"] and info["lm_head_spec"] == [None, "model"]
    assert info["input_specs"][0] == ["data", None]
    # the prefix entries are replicated over "data" (shared by the batch), heads on "model";
    # the per-request index follows the batch
    assert info["input_specs"][1] == [None, None, None, "model" if model <= 2 else None,
                                      None]
    assert info["input_specs"][2] == ["data"]
    assert info["input_shard_rows"] == 8 // data


@pytest.mark.parametrize("mesh", [f"{d}x{m}" for d, m in MESHES])
def test_shard_mapped_pallas_attention_matches_reference(findings, mesh):
    assert findings["meshes"][mesh]["pallas_max_err"] < 1e-4


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2].split(","), "--pallas" in sys.argv[3:])
