"""The Hopper family of the flash-attention kernel (`kernels/flash_attention_mgpu.py`, `family="mosaic_gpu"`).

Numerics run in JAX's Mosaic GPU interpreter on the CPU (the same kernel bodies the H100 compile builds),
against `attention_float64` of test_attention_masks.py (K/V repeated to the query heads, masks and dropout
bits spelled out) on the 16-bit inputs as given. The deviceless H100 compiles check registers and spills.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, needs_cuda, quiet
from test_attention_masks import attention_float64, gqa_inputs, rel_err, segments

from haiku_gpt import kernels
from haiku_gpt.kernels.dropout import dropout_keep_mask
from haiku_gpt.kernels.flash_attention import compiling_for, flash_attention

TOLERANCE = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}  # relative: P and dS are rounded to the input dtype for wgmma


def mgpu_value_and_grads(q, k, v, w, **kwargs):
    fn = functools.partial(flash_attention, family="mosaic_gpu", **kwargs)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w.astype(jnp.float32))  # noqa: E731
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def assert_matches_float64(dtype, q, k, v, w, **kwargs):
    out, grads = mgpu_value_and_grads(q, k, v, w, **kwargs)
    ref_out, ref_grads = attention_float64(q, k, v, w, **{k: x for k, x in kwargs.items() if k != "dropout_seed"},
                                           **({"dropout_seed": 9} if "dropout_seed" in kwargs else {}))
    assert out.dtype == dtype and [g.shape for g in grads] == [x.shape for x in (q, k, v)]
    errors = {"out": rel_err(out, ref_out)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("group,causal,seq,head_dim,dtype", [
    (1, True, 64, 64, jnp.bfloat16),     # one tile, nothing padded
    (2, True, 100, 48, jnp.float16),     # T and D padded (a padding tail in the diagonal tile)
    (4, False, 70, 64, jnp.bfloat16),    # non-causal: the last key tile masks its padding keys
    (8, True, 80, 128, jnp.float16),     # multi-query (8 query heads on 1 K/V head), head_dim 128
])
def test_gqa_matches_float64(group, causal, seq, head_dim, dtype):
    """Forward and the three gradients; dK/dV sum each group's query heads inside the kernel."""
    q, k, v, w = gqa_inputs(group, 1, seq, 8, 8 // group, head_dim, dtype=dtype)
    assert_matches_float64(dtype, q, k, v, w, causal=causal)


def test_segments_match_float64():
    """Random document lengths (a one-token document in row 0; row 1 one document) over 4 tiles of 64:
    row 0's tiles walk only the tiles of their documents."""
    q, k, v, w = gqa_inputs(6, 2, 200, 2, 1, 64, dtype=jnp.float16)
    ids = jnp.asarray(segments(6, 2, 200))
    assert_matches_float64(jnp.float16, q, k, v, w, segment_ids=ids)


def test_segments_gqa_and_dropout_together_match_float64():
    """Non-causal: every tile masked by segment ids alone, padding keys too."""
    q, k, v, w = gqa_inputs(8, 2, 90, 4, 2, 64, dtype=jnp.bfloat16)
    ids = jnp.asarray(segments(8, 2, 90))
    assert_matches_float64(jnp.bfloat16, q, k, v, w, causal=False, segment_ids=ids, dropout_rate=0.2,
                           dropout_seed=jnp.uint32(9))


@pytest.mark.parametrize("family,blocks", [("auto", {"block_q": 64, "block_k": 64}), ("mosaic_gpu", {})])
def test_tiles_outside_a_tiles_documents_are_never_read(family, blocks):
    """Three documents of one 64-row tile each, non-causal, both families: NaN in the middle document's K/V
    (forward, dQ) or Q and dO (dK/dV) reaches the other two only if their tiles visit its tile. Masking
    alone would not keep it out: a masked probability is 0, and 0 * NaN = NaN."""
    q, k, v, w = gqa_inputs(12, 1, 192, 4, 2, 64, dtype=jnp.float16)
    ids = jnp.asarray(np.repeat([[0, 1, 2]], 64, axis=1).astype(np.int32))
    middle, others = slice(64, 128), np.r_[0:64, 128:192]
    poison = lambda x: x.at[:, middle].set(jnp.nan)  # noqa: E731
    attend = functools.partial(flash_attention, causal=False, segment_ids=ids, family=family, **blocks)
    out = jax.jit(attend)(q, poison(k), poison(v))
    dq = jax.jit(jax.grad(lambda q: jnp.sum(attend(q, poison(k), poison(v)).astype(jnp.float32))))(q)
    loss = lambda k, v: jnp.sum(attend(poison(q), k, v).astype(jnp.float32) * poison(w))  # noqa: E731
    dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1)))(k, v)
    assert np.all(np.isnan(np.asarray(out[:, middle], np.float32)))  # the poison is real
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(x[:, others], np.float32)))


# Two CPU devices, the batch split over them: row 0 one document (every tile walked), row 1 three (each tile
# walks only its own), so one device finishes its kernels well before the other.
TWO_DEVICES = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from haiku_gpt.kernels.flash_attention import flash_attention
q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 192, 2, 64)), jnp.float16) for i in range(3))
ids = jnp.asarray(np.stack([np.zeros(192), np.repeat([0, 1, 2], 64)]).astype(np.int32))
run = jax.jit(lambda q, k, v, ids: flash_attention(q, k, v, segment_ids=ids, causal=False, family="mosaic_gpu"))
one = run(q, k, v, ids)
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
with jax.set_mesh(mesh):
    two = run(*(jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, ids)))
print("MAX DIFF", float(jnp.abs(one.astype(jnp.float32) - two.astype(jnp.float32)).max()))
"""


def test_data_parallel_devices_with_unequal_work_match_one_device():
    """The interpreter on a 2-device mesh whose devices skip different numbers of tiles: the same output as
    one device. (As released, JAX's interpreter checked every device's barriers when the first
    device finished and hung the other: `mosaic_gpu_interpret`'s second fix.)"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    try:
        run = subprocess.run([sys.executable, "-c", TWO_DEVICES], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the 2-device run hung:\n{(e.stderr or b'')[-2000:]}")
    assert run.returncode == 0 and "MAX DIFF 0.0" in run.stdout, run.stdout + run.stderr[-3000:]


def test_dropout_keeps_exactly_the_reference_bits():
    """V = identity: the output rows are the dropped probabilities, 0 exactly where the query head's bits
    (`kernels.dropout`, the reference's) drop, over two key tiles and a K/V head shared by two query heads."""
    batch, seq, heads, kv_heads, rate, seed = 2, 128, 4, 2, 0.3, 99
    q, k, _, _ = gqa_inputs(11, batch, seq, heads, kv_heads, seq, dtype=jnp.float16)
    v = jnp.broadcast_to(jnp.eye(seq, dtype=jnp.float16)[None, :, None, :], (batch, seq, kv_heads, seq))
    attend = functools.partial(flash_attention, dropout_rate=rate, dropout_seed=seed, family="mosaic_gpu")
    out = jax.jit(attend)(q, k, v)
    kept = np.asarray(out, np.float32).transpose(0, 2, 1, 3) != 0.0  # [B, H, Tq, Tk]
    expected = np.array(dropout_keep_mask(seed, batch, heads, seq, seq, rate)) & np.tril(np.ones((seq, seq), bool))
    np.testing.assert_array_equal(kept, expected)


def test_the_model_trains_with_it_like_the_triton_family(tiny_config):
    """--config.kernel_family=mosaic_gpu through config, model and train step: the loss of 3 bf16 steps is the
    default family's, to bf16 rounding."""
    from haiku_gpt.data import open_dataset, train_batches  # noqa: PLC0415
    from haiku_gpt.steps import make_steps  # noqa: PLC0415

    tiny_config.update(n_layer=1, n_head=2, n_embd=128, block_size=64, batch_size=2, dtype="bfloat16",
                       attention_impl="pallas", check_attention=False, dropout=0.1)
    ds = open_dataset(tiny_config.data_dir, tiny_config.dataset, tiny_config.block_size)
    x, y = train_batches(ds.splits["train"], 0, 0, 3, (1, 2), 64)
    losses = {}
    for family in ("auto", "mosaic_gpu"):
        tiny_config.kernel_family = family
        trainer = make_steps(tiny_config, ds.vocab_size)
        _, metrics = trainer.train_steps(trainer.init(0), x, y)
        losses[family] = np.asarray(metrics["loss"])
    np.testing.assert_allclose(losses["mosaic_gpu"], losses["auto"], rtol=1e-2)


# ---------------------------------------------------------------------------
# What it refuses, with the fix named
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float32"}, "bfloat16 or float16 inputs, not float32: add --config.dtype=bfloat16"),
    ({"head_dim": 256}, "head_dim up to 128"),
    ({"platform": "tpu"}, "compiles for NVIDIA Hopper GPUs"),
    ({"platform": "gpu", "device_kind": "NVIDIA A100-SXM4-80GB"}, "Hopper's wgmma and TMA"),
])
def test_configs_it_cannot_run_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kernels.check_attention_impl("pallas", kernel_family="mosaic_gpu", **kwargs)
    kernels.check_attention_impl("pallas", kernel_family="mosaic_gpu", platform="gpu", dtype="bfloat16",
                                 head_dim=128, device_kind="NVIDIA H200")  # accepted
    kernels.check_attention_impl("pallas", kernel_family="mosaic_gpu", platform="cpu")  # interpreted


def test_it_belongs_to_the_pallas_kernel_and_names_its_choices():
    with pytest.raises(ValueError, match="add --config.attention_impl=pallas"):
        kernels.check_attention_impl("xla", kernel_family="mosaic_gpu")
    with pytest.raises(ValueError, match="choose one of auto, mosaic_gpu"):
        kernels.check_attention_impl("pallas", kernel_family="hopper")


def test_the_kernel_refuses_what_it_cannot_run():
    q = jnp.ones((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="not float32"):
        flash_attention(q, q, q, family="mosaic_gpu")
    with pytest.raises(ValueError, match="leave block_q and block_k unset"):
        flash_attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), block_q=32,
                        family="mosaic_gpu")
    with compiling_for("NVIDIA A100-SXM4-80GB"), pytest.raises(ValueError, match="Hopper GPUs only"):
        flash_attention(*(q.astype(jnp.bfloat16),) * 3, family="mosaic_gpu")


# ---------------------------------------------------------------------------
# Deviceless H100 compiles: registers and spills
# ---------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("head_dim,dtype,seq", [(64, jnp.float16, 1000), (128, jnp.bfloat16, 4097)])
def test_h100_compiles_forward_and_backward_without_spills(head_dim, dtype, seq):
    """The step's three kernels with every mask at once (causal, padding, segment ids, GQA, dropout): the
    most registers they take. One warpgroup each; 255 registers and no spill."""
    from haiku_gpt.aot import targets  # noqa: PLC0415

    q = jax.ShapeDtypeStruct((2, seq, 8, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, seq, 2, head_dim), dtype)
    ids = jax.ShapeDtypeStruct((2, seq), jnp.int32)

    def grads(q, k, v, ids):
        fn = functools.partial(flash_attention, segment_ids=ids, dropout_rate=0.1, dropout_seed=3, family="mosaic_gpu")
        return jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    result = targets.compile_for("h100", grads, q, kv, kv, ids, kernels="flash_attention_mgpu")
    names = [k.name for k in result.kernels]
    assert names == ["flash_attention_mgpu_dkdv", "flash_attention_mgpu_dq", "flash_attention_mgpu_fwd"], names
    for kernel in result.kernels:
        assert kernel.gpu_arch == "sm_90a" and kernel.threads_per_block == 128, kernel
        assert kernel.registers <= 255 and kernel.spill_store_bytes == kernel.spill_load_bytes == 0, kernel


@needs_cuda
def test_check_mode_compiles_the_step_with_it_for_an_h100(tiny_config):
    """--mode=check --config.target=h100 with kernel_family=mosaic_gpu: the preflight traces the step as the
    target's compile does (the compiled kernels, not the CPU's interpreter: jit reuses those traces when it
    lowers for the target) and reports the three Hopper kernels, unknown shared memory said as unknown."""
    from haiku_gpt import preflight  # noqa: PLC0415
    from haiku_gpt.experiment import setup  # noqa: PLC0415

    tiny_config.update(target="h100", attention_impl="pallas", kernel_family="mosaic_gpu", dtype="bfloat16",
                       check_attention=False, n_layer=1, dropout=0.0)
    report = preflight.check_compiled(setup(tiny_config, quiet, mesh=preflight.target_mesh(tiny_config)))
    names = sorted(line.split(":")[0] for line in report.kernels)
    assert names == ["flash_attention_mgpu_dkdv", "flash_attention_mgpu_dq", "flash_attention_mgpu_fwd"], names
    assert all("0 bytes spilled, shared memory unknown" in line for line in report.kernels), report.kernels
