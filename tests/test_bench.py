"""Smoke test of the benchmark at its smallest setting: it runs and reports numbers (no time is asserted)."""

import math

from haiku_gpt.configs import tiny
from haiku_gpt.benchmarks import bench


def finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_train_sample_attention_smallest_setting():
    config = tiny.get_config()
    config.check_attention = False
    result = bench.bench_train(config, iters=3, warmup=1, vocab=65)
    assert finite_positive(result["ms_per_iter"]) and finite_positive(result["mfu"])
    assert result["n_params"] > 0

    sample = bench.bench_sample(config, vocab=65, new_tokens=4)
    assert [r["variant"] for r in sample["rows"]][:2] == ["kv cache", "full recompute (nanoGPT)"]
    assert all(finite_positive(r["tokens_per_sec"]) for r in sample["rows"])

    attention = bench.bench_attention(config, seqs=[16], impls=["reference", "xla", "pallas"], iters=2,
                                      max_interpret_seq=16)
    assert {r["impl"] for r in attention["rows"]} == {"reference", "xla", "pallas"}
    assert all(finite_positive(r["fwd_bwd_ms"]) for r in attention["rows"])


def test_bench_checkpoint_smallest_setting(tmp_path):
    config = tiny.get_config()
    result = bench.bench_checkpoint(config, vocab=65, rounds=1, out_dir=str(tmp_path / "ckpt"))
    assert all(finite_positive(result[k]) for k in ("npz_blocking_s", "orbax_blocking_s", "orbax_written_s"))
    assert result["orbax_written_s"] >= result["orbax_blocking_s"] and result["state_gb"] > 0
    assert not (tmp_path / "ckpt").exists()


def test_gpu_breakdown_tells_float32_gemm_fusions_from_bf16_ones():
    """The --what=gpu breakdown finds the fusions whose dot reads two f32 operands (the dtypes come from the
    parameters, declared on other lines) and counts their kernels as float32 GEMMs."""
    from haiku_gpt.benchmarks import gpu_bench

    def computation(name, dtype):
        return (f"%{name} (p0: {dtype}[4,4], p1: {dtype}[4,4]) -> f32[4,4] {{\n"
                f"  %{name}_p0 = {dtype}[4,4]{{1,0}} parameter(0)\n  %{name}_p1 = {dtype}[4,4]{{1,0}} parameter(1)\n"
                f"  ROOT %{name}_dot = f32[4,4]{{1,0}} dot(%{name}_p0, %{name}_p1), lhs_contracting_dims={{1}}\n}}\n")

    hlo = (computation("f32_gemm", "f32") + computation("bf16_gemm", "bf16") +
           "ENTRY %main (a: f32[4,4]) -> f32[4,4] {\n"
           "  %gemm_fusion.1 = f32[4,4]{1,0} fusion(%a, %a), kind=kCustom, calls=%f32_gemm\n"
           "  %gemm_fusion.2 = f32[4,4]{1,0} fusion(%a, %a), kind=kCustom, calls=%bf16_gemm\n}\n")
    fusions = gpu_bench.float32_gemm_fusions(hlo)
    assert fusions == {"gemm_fusion_1"}
    assert gpu_bench._category("gemm_fusion_1", fusions) == "float32 GEMM"
    assert gpu_bench._category("gemm_fusion_2", fusions) == "bf16 GEMM"
    assert gpu_bench._category("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT", fusions) == "bf16 GEMM"
    assert gpu_bench._category("flash_attention_dkdv", fusions) == "attention kernels"
