"""The flash-attention kernel and the train step on the real GPU and TPU compilers (no hardware).

Each case compiles `jax.grad` of the kernel (so the forward kernel and the three backward
kernels are in one program) for a compile-only A100, H100 or TPU and checks what the
compilers report: it compiles, no kernel spills a register, shared memory / scoped VMEM
fit, and Hopper's dK/dV wgmma instructions are not serialized. `--mode=check
--config.target=...` is exercised through `preflight.check_compiled`. Skipped, saying so, without
the `aot` extra (`pip install -e '.[aot]'`).
"""

import math
import os

import pytest

from conftest import _aot_missing, needs_cuda, needs_tpu, quiet
from haiku_gpt import preflight
from haiku_gpt.aot import kernel_matrix, targets
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import setup


# (target, dtype, head_dim, seq, dropout): head_dim 256 in both dtypes, odd lengths,
# sequences of 32k and 128k on TPU (K/V streamed through the grid), dropout on and off.
GPU_CASES = [
    ("h100", "float32", 256, 1000, 0.1),  # shared memory overflowed here before per-target tiles
    ("h100", "bfloat16", 64, 1000, 0.1),  # wgmma: the transposed dK/dV keeps it pipelined
    ("a100", "float32", 256, 77, 0.0),
    ("h100", "float32", 128, 20, 0.1),  # one block: ptxas spilled 32x32 tiles here, not at 1000
    ("a100", "bfloat16", 256, 1000, 0.1),
    ("h100", "float32", 256, 65536, 0.1),  # 16x16 tiles spilled 8 bytes in dK/dV here, not at 1000
]
TPU_CASES = [
    ("tpu-v5e:1x1", "bfloat16", 128, 32768, 0.1),  # VMEM ran out at 8k (backward) before streaming
    ("tpu-v6e:1x1", "float32", 256, 131072, 0.0),
    ("tpu-v4:1x1x1", "float32", 256, 1000, 0.1),
    ("tpu-v5p:1x1x1", "bfloat16", 16, 77, 0.0),
]


# Grouped-query K/V (2 query heads over 1 K/V head) with segment ids, bf16 and float32, odd lengths.
MASKED_CASES = [("h100", "bfloat16", 64, 1000, 0.1), ("h100", "bfloat16", 128, 2049, 0.0),
                ("a100", "float32", 64, 77, 0.0), ("tpu-v5e:1x1", "bfloat16", 128, 4097, 0.1),
                ("tpu-v6e:1x1", "float32", 64, 1000, 0.0)]


def _check(row: dict) -> None:
    assert row["ok"], row["error"]
    assert set(row["kernels"]) == {"forward", "delta", "dkdv", "dq"}, row["kernels"]


@needs_cuda
@pytest.mark.parametrize("target,dtype,head_dim,seq,dropout", GPU_CASES)
def test_gpu_kernels_compile_without_spills(target, dtype, head_dim, seq, dropout):
    row = kernel_matrix.compile_case(kernel_matrix.Case(target, dtype, head_dim, seq, dropout, "bwd"))
    _check(row)
    limit = kernel_matrix._gpu_shared_memory_per_block(targets.parse_target(target).generation)
    for name, kernel in row["kernels"].items():
        assert kernel["spill_bytes"] == 0 and 0 < kernel["registers"] <= 255, (name, kernel)
        assert 0 < kernel["smem_bytes"] <= limit, (name, kernel)
        assert not [w for w in kernel["warnings"] if "serialized" in w], (name, kernel["warnings"])


@needs_cuda
def test_mosaic_gpu_kernels_are_reported_by_their_pallas_names():
    """Pallas Mosaic GPU kernels (the Hopper route) compile inside XLA's compile for an H100; the report
    names them by their kernel name, with ptxas' registers and spills, the PTX's threads per block and
    their launch (grid, dynamic shared memory) unknown. The dump variables are set only during it. The
    plugin compiles (and dumps) a kernel once per process: the same program again is refused, not reported
    without its kernels."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def double(x, name):
        def body(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2

        return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), kernel_name=name)(x)

    before = {name: os.environ.get(name) for name in ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTX")}
    program = lambda x: double(double(x, "mosaic_first") + 1, "mosaic_second")  # noqa: E731
    x = jax.ShapeDtypeStruct((128,), jnp.float32)
    result = targets.compile_for("h100", program, x, kernels="mosaic_")
    assert [k.name for k in result.kernels] == ["mosaic_first", "mosaic_second"], result.kernels
    for kernel in result.kernels:
        assert 0 < kernel.registers <= 255 and kernel.spill_store_bytes == kernel.spill_load_bytes == 0, kernel
        assert kernel.threads_per_block == 128 and kernel.gpu_arch == "sm_90a", kernel  # one warpgroup
        assert kernel.grid is None and kernel.dynamic_shared_memory_bytes is None, kernel
    assert {name: os.environ.get(name) for name in before} == before
    with pytest.raises(targets.TargetError, match="2 of the program's 2 Mosaic GPU kernels were compiled earlier"):
        targets.compile_for("h100", program, x, kernels="mosaic_")
    assert targets.compile_for("h100", program, x).kernels == ()  # no report asked for: compiles as ever


@needs_cuda
def test_a_tile_pair_gives_the_forward_and_the_backward_their_own_tiles(monkeypatch):
    """An entry (forward tiles, backward tiles) of the Hopper table: the compiled forward kernel runs the first's
    warps, the delta, dK/dV and dQ kernels the second's (what --what=tiles measures on a GPU)."""
    from haiku_gpt.kernels import flash_attention as fa

    monkeypatch.setitem(fa._TRITON_16BIT[9], 64, ((64, 64, 4, 3), (64, 32, 8, 2)))
    row = kernel_matrix.compile_case(kernel_matrix.Case("h100", "bfloat16", 64, 1000, 0.0, "bwd"))
    _check(row)
    assert row["kernels"]["forward"]["warps"] == 4
    assert {row["kernels"][name]["warps"] for name in ("delta", "dkdv", "dq")} == {8}


@pytest.mark.parametrize("target,dtype,head_dim,seq,dropout", MASKED_CASES)
def test_gqa_and_segment_ids_compile_without_spills(target, dtype, head_dim, seq, dropout):
    if _aot_missing(target):
        pytest.skip(_aot_missing(target))
    row = kernel_matrix.compile_case(kernel_matrix.Case(target, dtype, head_dim, seq, dropout, "bwd", kv_heads=1,
                                                        segments=True))
    _check(row)
    for name, kernel in row["kernels"].items():
        if target.startswith("tpu"):
            assert kernel["vmem_bytes"] is not None and kernel["vmem_bytes"] <= kernel["vmem_limit_bytes"], name
        else:
            assert kernel["spill_bytes"] == 0 and 0 < kernel["registers"] <= 255, (name, kernel)


@needs_tpu
@pytest.mark.parametrize("target,dtype,head_dim,seq,dropout", TPU_CASES)
def test_tpu_kernels_compile_at_any_length(target, dtype, head_dim, seq, dropout):
    row = kernel_matrix.compile_case(kernel_matrix.Case(target, dtype, head_dim, seq, dropout, "bwd"))
    _check(row)
    for name, kernel in row["kernels"].items():
        assert kernel["vmem_bytes"] is not None and kernel["vmem_bytes"] <= kernel["vmem_limit_bytes"], name


def test_a_rejected_compile_is_a_failed_row_not_an_exception(monkeypatch):
    """The matrix reports what a compiler rejects; here the compiler is made to reject."""
    def reject(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Shared memory size limit exceeded\nsecond line")

    monkeypatch.setattr(targets, "compile_for", reject)
    monkeypatch.setattr(targets, "devices", lambda target: [None])
    monkeypatch.setattr("jax.sharding.SingleDeviceSharding", lambda device: None)
    row = kernel_matrix.compile_case(kernel_matrix.Case("h100", "float32", 256, 64, 0.0, "fwd"))
    assert not row["ok"] and row["error"] == "RuntimeError: RESOURCE_EXHAUSTED: Shared memory size limit exceeded"
    assert "FAIL: RuntimeError" in kernel_matrix.markdown([row])


# --- --mode=check --config.target=... -------------------------------------------------------------


def _setup(config):
    """setup() as --mode=check does it: the target's compile-only devices resolved by the preflight."""
    return setup(config, quiet, mesh=preflight.target_mesh(config))


def _target_config(tiny_config, target: str, **overrides):
    """The tiny config for --mode=check on `target`, without dropout unless asked: the kernels' dropout
    variants are compiled, spills checked, by the kernel-matrix tests above, and dropout's hashed keep masks
    make the whole-step compile for a GPU two to three times slower (one layer, h100x2: 3.9 -> 12.5 s of CPU)."""
    tiny_config.target = target
    tiny_config.check_attention = False
    tiny_config.attention_impl = "pallas"
    tiny_config.dropout = 0.0
    for key, value in overrides.items():
        tiny_config[key] = value
    return tiny_config


@needs_tpu
def test_check_compiles_the_sharded_train_step_for_a_tpu_slice(tiny_config):
    # With dropout: the one whole sharded step compiled for a target with its residual dropout masks.
    report = preflight.check_compiled(_setup(_target_config(tiny_config, "tpu-v5e:2x2", fsdp=True, dropout=0.1)))
    assert report.devices == 4 and "tpu-v5e:2x2: 4 x TPU v5 lite" in report.device
    assert report.available == 16 * 2**30 and report.memory["peak"] > 0
    assert report.compiled_flops and report.compiled_flops > 0
    names = sorted(line.split(":")[0] for line in report.kernels)
    assert names == ["flash_attention_delta", "flash_attention_dkdv", "flash_attention_dq",
                     "flash_attention_forward"], report.kernels
    assert all("VMEM" in line for line in report.kernels)
    assert "kernel flash_attention_dkdv" in report.table()


@needs_cuda
def test_check_reports_gpu_kernel_registers_for_a_gpu_host(tiny_config):
    # One layer: every layer compiles the same four kernels.
    report = preflight.check_compiled(_setup(_target_config(tiny_config, "h100x2", n_layer=1)))
    assert report.devices == 2 and report.memory["peak"] < report.available
    assert all("0 bytes spilled" in line for line in report.kernels), report.kernels
    assert len(report.kernels) == 4


def test_check_refuses_gpt2_xl_on_a_tpu_slice_without_fsdp_and_names_the_fixes(tiny_config):
    """GPT-2 XL's replicated AdamW state (25 GB) cannot fit a 16 GiB v5e chip: refused
    before anything is traced or compiled, with fsdp first among the fixes."""
    config = _target_config(tiny_config, "tpu-v5e:2x4", n_layer=48, n_head=25, n_embd=1600,
                            block_size=1024, batch_size=8)
    with pytest.raises(UserError) as e:
        preflight.check_compiled(_setup(config))
    message = str(e.value)
    assert "would not fit in memory" in message and "TPU v5 lite HBM per device" in message
    assert "--config.fsdp=True" in message and "16.00 GiB" in message


def test_target_with_a_bad_name_is_a_clear_error(tiny_config):
    with pytest.raises(UserError, match="valid targets are"):
        preflight.check_compiled(_setup(_target_config(tiny_config, "b200x8")))


_LOOP_HLO = """HloModule m

%fused_r (q: f32[8], w: f32[8,4]) -> f32[8] {
  %q = f32[8]{0} parameter(0)
  %w.1 = f32[8,4]{1,0} parameter(1)
  ROOT %s = f32[8]{0} add(%q, %q)
}

%body (p: (s32[], f32[8], f32[8,4], f32[2], f32[2], /*index=5*/f32[2])) -> (s32[], f32[8], f32[8,4], f32[2], f32[2], /*index=5*/f32[2]) {
  %p = (s32[], f32[8]{0}, f32[8,4]{1,0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %w = f32[8,4]{1,0} get-tuple-element(%p), index=2
  %r = f32[8]{0} fusion(%x, %w), kind=kInput, calls=%fused_r
  %n = s32[] add(%i, %i)
  ROOT %t = (s32[], f32[8]{0}, f32[8,4]{1,0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}) tuple(%n, %r, %w, %x, %x, /*index=5*/%x)
}

%cond (p.1: (s32[], f32[8], f32[8,4], f32[2], f32[2], /*index=5*/f32[2])) -> pred[] {
  %p.1 = (s32[], f32[8]{0}, f32[8,4]{1,0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %i.1), direction=LT
}

%br0 (x0: f32[8]) -> f32[8] {
  %x0 = f32[8]{0} parameter(0)
  ROOT %neg = f32[8]{0} negate(%x0)
}

%br1 (x1: f32[8]) -> f32[8] {
  %x1 = f32[8]{0} parameter(0)
  ROOT %abs = f32[8]{0} abs(%x1)
}

ENTRY %main (a: f32[8], b: f32[8,4], c: f32[2]) -> bf16[8] {
  %a = f32[8]{0} parameter(0)
  %b = f32[8,4]{1,0} parameter(1)
  %c = f32[2]{0} parameter(2)
  %zero = s32[] constant(0)
  %t0 = (s32[], f32[8]{0}, f32[8,4]{1,0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}) tuple(%zero, %a, %b, %c, %c, /*index=5*/%c)
  %loop = (s32[], f32[8]{0}, f32[8,4]{1,0}, f32[2]{0}, f32[2]{0}, /*index=5*/f32[2]{0}) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[8]{0} get-tuple-element(%loop), index=1
  %one = s32[] constant(1)
  %branched = f32[8]{0} conditional(%one, %y, %y), branch_computations={%br0, %br1}
  %k = f32[8]{0} custom-call(%branched, %branched), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/attn/flash_attention_forward/pallas_call"}
  %k2 = f32[8]{0} custom-call(%k, %a), custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{}: (1, {})}
  ROOT %z = bf16[8]{0} convert(%k2)
}
"""


def test_kernel_traffic_counts_a_loops_body_per_trip_and_the_bytes_each_kernel_moves():
    """The kernels of a module: the while body's once per known trip (not its condition, not the fusion's own
    computation), a conditional's branches once each, each kernel with its operands read whole (an array
    passed twice, once; one its output aliases, not at all) and its result written; a Pallas call named as a
    GPU trace names it; tuples longer than five (their `/*index=5*/` marks) parsed."""
    kernels = {k.name: k for k in targets.kernel_traffic(_LOOP_HLO)}
    assert set(kernels) == {"r", "n", "neg", "abs", "flash_attention_forward", "k2", "z"}
    assert (kernels["k2"].opcode, kernels["k2"].bytes) == ("custom-call", 4 * 8 + 4 * 8)  # %k read, %a written
    assert [(kernels[b].launches, kernels[b].bytes) for b in ("neg", "abs")] == [(1, 64)] * 2
    assert (kernels["r"].launches, kernels["r"].bytes) == (3, 4 * 8 + 4 * 8 + 4 * 32)
    assert (kernels["n"].launches, kernels["n"].bytes) == (3, 4 + 4)  # add(%i, %i): %i read once
    assert (kernels["flash_attention_forward"].opcode, kernels["flash_attention_forward"].bytes) == ("custom-call", 64)
    assert (kernels["z"].launches, kernels["z"].bytes) == (1, 2 * 8 + 4 * 8)


# --- the bf16 train step on an H100: what the GPU runs, read from its optimized HLO ---------------


def _h100_bf16_step_ops(vocab: int, **fields):
    """The optimized HLO of a bf16 train step (pallas attention) compiled for an H100, as HloOps."""
    import jax
    import jax.numpy as jnp

    from haiku_gpt.configs import tiny
    from haiku_gpt.steps import make_steps

    config = tiny.get_config()
    config.update(dtype="bfloat16", attention_impl="pallas", dropout=0.0, target="h100", **fields)
    steps = make_steps(config, vocab, targets.make_mesh(targets.parse_target("h100")))
    batch = jax.ShapeDtypeStruct((1, 1, config.batch_size, config.block_size), jnp.int32)
    result = targets.compile_for("h100", steps.train_steps, steps.abstract_state(), batch, batch)
    return targets.hlo_ops(result.compiled.as_text())


@pytest.fixture(scope="module")
def h100_bf16_step_ops():
    """GPT-2's vocabulary and head_dim 64, small otherwise, with the lm_head + cross-entropy in four chunks of
    512 of its 2,048 tokens."""
    return _h100_bf16_step_ops(50304, n_layer=2, n_embd=128, n_head=2, block_size=256, batch_size=8,
                               loss_chunk_tokens=512)


@needs_cuda
def test_bf16_train_step_on_h100_runs_every_gemm_in_bf16(h100_bf16_step_ops):
    """No float32 x float32 GEMM (the tied lm_head's backward ran two, at TF32 speed, on the float32 logits'
    gradient). The logits exist one [512, V] chunk at a time, and only in bf16: what the kernels write to
    memory (fusion and custom-call results) holds no float32 [*, V] array, which the softmax's passes would
    read at twice the bytes."""
    dots = [op for op in h100_bf16_step_ops if op.opcode == "dot"]
    assert len(dots) >= 3 * 2 * 4 + 3, dots  # the layers' GEMMs, forward and backward, and the lm_head's three
    assert [op for op in dots if op.operand_dtypes != ("bf16", "bf16")] == []
    written = [(op.name, *result) for op in h100_bf16_step_ops if op.opcode in ("fusion", "custom-call")
               for result in op.results if result[1][-1:] == (50304,)]
    assert written and {(dtype, shape) for _, dtype, shape in written} == {("bf16", (512, 50304))}, written


@needs_cuda
def test_bf16_train_step_on_h100_has_no_layout_copies(h100_bf16_step_ops):
    """The Pallas kernels read q/k/v and write o (and their gradients) in the model's [B, T, H, D]: no
    transposes around them, no slices and no concatenation: they read q, k and v straight out of the c_attn
    GEMM's output (`flash_attention_qkv`), where three slices copied them out, and write dK, dV and then dQ
    into one d(qkv), which XLA concatenated. No copies of the float32 state either (params, AdamW's mu and
    nu: the update writes the donated buffers in place); the chunked loss's scan copies only a bf16 chunk
    and counters."""
    assert [op for op in h100_bf16_step_ops if op.opcode == "transpose"] == []
    assert [op for op in h100_bf16_step_ops if op.opcode == "slice" and math.prod(op.shape) > 2] == []
    assert [op for op in h100_bf16_step_ops if op.opcode == "concatenate" and op.dtype == "bf16"] == []
    copies = [op for op in h100_bf16_step_ops if op.opcode == "copy" and op.dtype == "f32"]
    assert all(math.prod(op.shape) <= 1 for op in copies), copies
    kernels = [op for op in h100_bf16_step_ops if op.opcode == "custom-call"]
    assert len(kernels) >= 2 * 4, kernels  # forward, delta, dK/dV and dQ per layer


@needs_cuda
def test_bf16_train_step_on_h100_sums_each_global_norm_in_one_reduction(h100_bf16_step_ops):
    """The gradient's norm (the clip's, also logged) and the parameters' are one reduction each over all 15
    leaves; optax.tree.norm's per-leaf sums were two kernels a leaf on a GPU (150 of a gpt2_124m step's 1,038
    kernels, 804 now). The update's norm keeps its per-leaf sums, fused into AdamW's kernels."""
    leaves = 2 * 6 + 3  # per layer: c_attn, c_proj, c_fc, c_proj weights, ln_1, ln_2 scales; wte, wpe, ln_f
    scalar_sums = [op for op in h100_bf16_step_ops if op.opcode == "reduce" and op.shape == ()]
    assert len(scalar_sums) <= leaves + 3, len(scalar_sums)  # was 3 per leaf + 1 (46)


@needs_cuda
def test_a_small_vocabulary_is_embedded_without_a_scatter():
    """shakespeare_char's 65 characters: the embedding's gradient is a GEMM (one-hot), not a scatter-add whose
    16,384 tokens collide on 65 rows (on an H200 that scatter took 25.7 of the bf16 step's 30.9 ms)."""
    ops = _h100_bf16_step_ops(65, n_layer=1, n_embd=384, n_head=6, block_size=256, batch_size=64)
    assert [op for op in ops if op.opcode in ("scatter", "gather")] == []
