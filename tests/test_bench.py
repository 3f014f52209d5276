"""Smoke test of the benchmark at its smallest setting: it runs and reports numbers (no time is asserted)."""

import json
import math

import pytest

from conftest import needs_cuda
from haiku_gpt.configs import tiny
from haiku_gpt.benchmarks import bench


def finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_train_sample_attention_smallest_setting(tmp_path):
    config = tiny.get_config()
    config.check_attention = False
    result = bench.bench_train(config, iters=3, warmup=1, vocab=65, trace_dir=str(tmp_path), trace_steps=2)
    assert finite_positive(result["ms_per_iter"]) and finite_positive(result["mfu"])
    assert result["n_params"] > 0
    assert list(tmp_path.glob("**/perfetto_trace.json*")), "--trace_dir wrote no Perfetto trace"
    assert result["traced_steps"] == max(2 // config.steps_per_call, 1) * config.steps_per_call

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


@needs_cuda
def test_bench_hlo_reads_a_bf16_h100_steps_kernels_and_bytes():
    """--what=hlo: the step compiled for an H100 without one, dtype=auto resolved for it (bf16). Its kernels by
    the trace breakdown's categories: four Pallas kernels a layer, no float32 GEMM; the loss loop's kernels
    counted once per chunk, and the bytes at least the bf16 logits written once and read three times."""
    config = tiny.get_config()
    config.update(attention_impl="pallas", dropout=0.0, n_layer=2, n_embd=128, n_head=2, block_size=256,
                  batch_size=8, loss_chunk_tokens=512)
    result = bench.bench_hlo(config, vocab=50304, target="h100")
    assert result["dtype"] == "bfloat16" and result["tokens_per_call"] == config.steps_per_call * 8 * 256
    counts, gb = result["kernels_per_call"], result["gb_per_call"]
    assert counts["attention kernels"] == 4 * 2 * config.steps_per_call and counts["float32 GEMM"] == 0
    assert result["kernels"] == sum(counts.values()) and math.isclose(result["total_gb"], sum(gb.values()))
    chunks = 8 * 256 // 512
    assert {k["launches"] for k in result["top_kernels"]} >= {chunks * config.steps_per_call}
    assert result["total_gb"] > config.steps_per_call * chunks * 4 * 512 * 50304 * 2 / 1e9


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


def test_gpu_kernel_table_counts_the_flops_the_document_mask_leaves():
    """--what=gpu's attention rows, run here on the CPU at a tiny shape: a document-masked row counts the causal
    FLOPs within each document (4 documents: a quarter of the causal count), a grouped-query row names its K/V
    heads, and XLA times only the plain causal rows."""
    from haiku_gpt.benchmarks import gpu_bench

    rows = gpu_bench.kernel_table(shapes=((1, 64, 2, 16, 2, 1), (1, 64, 2, 16, 1, 4)), impls=("pallas", "xla"))
    causal, _, masked, xla = rows
    assert masked["shape"] == "B1 T64 H2 KV1 D16 4 docs" and xla == {"shape": masked["shape"], "impl": "xla",
                                                                       "skipped": "causal rows only"}
    flops = lambda row: row["fwd_tflops"] * row["fwd_ms"]
    assert math.isclose(flops(masked), flops(causal) / 4, rel_tol=1e-9)
    assert all(finite_positive(r["fwd_bwd_tflops"]) for r in (causal, masked))


def test_gpu_check_compares_a_family_with_the_reference_and_reports_refusals():
    """--what=gpu's first table, run here on the CPU for the Hopper family (interpreted; the Triton family's
    rows take the same path): bf16 inputs with an odd length and head_dim, dropout and documents pass within
    the tests' bf16 tolerance; its refusal of head_dim 256 is a row with its reason, and the markdown says NO."""
    from haiku_gpt.benchmarks import gpu_bench

    rows = gpu_bench.correctness_table(cases=((1, 37, 2, 1, 48, True, 0.1, 2), (1, 3, 2, 2, 256, False, 0.0, 1)),
                                       families=("mosaic_gpu",), seed=5)
    assert [(r["case"], r["family"]) for r in rows] == [("B1 T37 H2 KV1 D48 causal dropout 0.1 2 docs", "mosaic_gpu"),
                                                        ("B1 T3 H2 KV2 D256 non-causal", "mosaic_gpu")]
    assert rows[0]["ok"] and 0 < max(rows[0][x] for x in ("out", "dq", "dk", "dv")) <= 2e-2, rows
    assert "head_dim up to 128" in rows[1]["error"], rows[1]
    table = gpu_bench.markdown({"device": "cpu", "jax": "-", "check": rows})
    assert table.count("| yes |") == 1 and table.count("| NO |") == 1, table


def test_gpu_check_runs_each_family_in_a_child_and_survives_a_hang_or_a_crash(monkeypatch, tmp_path):
    """--what=gpu checks each family in a child process: its rows come back as JSON; a child that hangs is
    killed at the timeout and one that crashes is one "fatal" row; run() then times that family nowhere."""
    import sys

    from haiku_gpt.benchmarks import gpu_bench

    assert gpu_bench.check_in_child("mosaic_gpu", seed=1, cases=()) == []  # the real child, no cases
    hang = [sys.executable, "-c", "print('case=B1 T9  family=auto', flush=True); import time; time.sleep(60)"]
    rows = gpu_bench.check_in_child("auto", seed=1, timeout_s=2, command=hang)
    assert rows[0]["fatal"] and "killed after 1 of 6 cases" in rows[0]["error"], rows
    rows = gpu_bench.check_in_child("auto", seed=1, command=[sys.executable, "-c", "import sys; sys.exit('bad PTX')"])
    assert rows[0]["fatal"] and "exit status 1): bad PTX" in rows[0]["error"], rows

    timed = []
    monkeypatch.setattr(gpu_bench, "check_in_child", lambda family, seed: (
        [{"case": "all cases", "family": family, "seed": seed, "fatal": True, "error": "hung"}]
        if family == "mosaic_gpu" else [{"case": "c", "family": family, "seed": seed, "ok": True,
                                         "out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}]))
    monkeypatch.setattr(gpu_bench, "kernel_table", lambda impls: timed.extend(impls) or [])
    monkeypatch.setattr(gpu_bench, "train_step_speed", lambda config, vocab: timed.append(
        (config.attention_impl, config.kernel_family)) or {"ms_per_iter": 1.0, "tokens_per_sec": 1.0, "mfu": 0.1})
    results = gpu_bench.run(None, "data", str(tmp_path), parts=("check", "kernels", "gpt2"))
    assert timed == ["pallas", "cudnn", "xla", ("pallas", "auto"), ("cudnn", "auto")], timed
    assert "not timed" in results["gpt2"]["haiku_gpt pallas mosaic_gpu"]["error"]
    assert "| every shape | pallas mosaic_gpu | not timed: its check hung or crashed |" in gpu_bench.markdown(results)
    assert (tmp_path / "gpu-check-kernels-gpt2.md").exists() and not (tmp_path / "gpu.md").exists()
    timed.clear()  # a later call of the same run (split parts) still leaves the hung family out
    results = gpu_bench.run(None, "data", str(tmp_path), parts=("kernels",))
    assert timed == ["pallas", "cudnn", "xla"], timed

    assert gpu_bench.parse_parts(["check", "kernels"]) == ("check", "kernels")
    for bad, reason in ((["check", "kernel"], "'kernel' is not a part"), ([], "nothing is not a part"),
                        (["breakdown"], "add gpt2")):
        with pytest.raises(ValueError, match=reason):
            gpu_bench.parse_parts(bad)


def test_tile_sweep_picks_a_forward_and_a_backward_tile_and_restores_the_table():
    """--what=tiles's plumbing at a tiny shape (on the CPU the kernel runs interpreted, so the times say nothing
    about the tiles): a row per candidate, the fastest of each pass chosen, the kernel's table as it was."""
    from haiku_gpt.benchmarks import gpu_bench
    from haiku_gpt.kernels import flash_attention as fa

    before = {g: dict(t) for g, t in fa._TRITON_16BIT.items()}
    candidates = {"forward": {16: ((64, 64, 4, 3), (32, 32, 4, 2))}, "backward": {16: ((64, 32, 8, 2),)}}
    result = gpu_bench.tile_sweep(shapes={16: (1, 32, 2)}, candidates=candidates, budget_s=120)
    assert [(r["pass"], r["tiles"]) for r in result["rows"]] == [
        ("forward", (64, 64, 4, 3)), ("forward", (32, 32, 4, 2)), ("backward", (64, 32, 8, 2))]
    fastest = min(result["rows"][:2], key=lambda r: r["ms"])["tiles"]
    assert result["chosen"] == {16: (fastest, (64, 32, 8, 2))}
    assert fa._TRITON_16BIT == before


def test_gpu_breakdown_counts_kernels_and_the_span_of_a_step(tmp_path):
    """The trace breakdown from a two-step Perfetto trace: ms and kernels per step by category, and the time from
    the first kernel to the last (what the GPU was busy within, idle gaps included); its table puts the GB the
    compiled step moves beside each category's time, and their rate."""
    import json

    from haiku_gpt.benchmarks import gpu_bench

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}}]
    kernels = [("nvjet_sm90_gemm", 0, 3000), ("flash_attention_forward", 3000, 1000), ("loop_add_fusion", 5000, 500),
               ("nvjet_sm90_gemm", 10000, 3000), ("flash_attention_forward", 13000, 1000),
               ("loop_add_fusion", 15000, 500)]
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    result = gpu_bench.gpu_time_breakdown(str(path), steps_traced=2)
    assert result["ms_per_step"]["bf16 GEMM"] == 3.0 and result["ms_per_step"]["attention kernels"] == 1.0
    assert result["kernels_per_step"] == {**dict.fromkeys(gpu_bench.CATEGORIES, 0), "bf16 GEMM": 1,
                                          "attention kernels": 1, "other fusions": 1}
    assert result["total_ms_per_step"] == 4.5 and result["first_to_last_kernel_ms_per_step"] == 7.75
    hlo = {"gb_per_call": {**dict.fromkeys(gpu_bench.CATEGORIES, 0.0), "bf16 GEMM": 6.0, "other fusions": 1.0},
           "total_gb": 7.0}
    table = gpu_bench.markdown({"device": "cpu", "jax": "-", "breakdown": {**result, "hlo": hlo}})
    assert "| bf16 GEMM | 3.00 | 1 | 6.00 | 2.00 |" in table and "| total | 4.50 | 3 | 7.00 | 1.56 |" in table
    assert "| transposes | 0.00 | 0 | 0.00 | |" in table


def test_cpu_bench_gemm_shapes_are_the_steps_weight_matmuls():
    """--what=cpu's GEMMs: each weight matmul's forward, dX and dW; their FLOPs are 6 x tokens x weights,
    the matmul part of costs.flops_per_token (GQA narrows c_attn to C + 2 x kv_heads x head_dim)."""
    from haiku_gpt.benchmarks import cpu_bench
    from haiku_gpt.config import model_config

    config = tiny.get_config()
    config.n_kv_head = 1
    mcfg = model_config(config, 65)
    config.gradient_accumulation_steps, config.loss_chunk_tokens = 3, config.batch_size * config.block_size // 2
    shapes = cpu_bench.gemm_shapes(config, mcfg)
    n, c, q = config.batch_size * config.block_size, mcfg.n_embd, mcfg.n_embd + 2 * mcfg.head_dim
    assert shapes[:3] == [("c_attn forward", n, q, c, 3 * mcfg.n_layer), ("c_attn dX", n, c, q, 3 * mcfg.n_layer),
                          ("c_attn dW", c, q, n, 3 * mcfg.n_layer)]
    assert shapes[-1] == ("lm_head dW", 65, c, n // 2, 6)  # two loss chunks a micro-batch, [V, C] like wte
    weights = mcfg.n_layer * (c * q + c * c + 8 * c * c) + 65 * c
    assert sum(2 * m * nn * k * count for _, m, nn, k, count in shapes) == 6 * 3 * n * weights

    table = cpu_bench.gemm_table([("tiny", 8, 16, 4, 3)], dtypes=("float32",), repeats=2)
    assert finite_positive(table["rows"][0]["xla float32"]) and finite_positive(table["step_gemm_ms"]["xla float32"])


def test_cpu_bench_splits_a_steps_wall_time_by_what_runs(tmp_path):
    """The trace breakdown counts wall time, not thread time: a matmul on one thread hides a fusion on the
    other; wrappers (ThunkExecutor) are not thunks; a gap where no thunk runs is its own row."""
    from haiku_gpt.benchmarks import cpu_bench

    def meta(tid, name):
        return {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}

    def event(tid, name, ts, dur):
        return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}

    events = [meta(1, "tf_XLAEigen/1"), meta(2, "tf_XLAEigen/2"), meta(3, "python"),
              event(1, "ThunkExecutor::Execute", 0, 20_000), event(2, "while.2", 0, 20_000),
              event(1, "ynn_fusion.3", 0, 10_000),
              event(2, "multiply_add_fusion.1", 5_000, 10_000), event(2, "transpose_copy_fusion", 18_000, 2_000),
              event(3, "ynn_fusion.9", 15_000, 3_000)]  # not an XLA thread: not counted
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    result = cpu_bench.wall_breakdown(str(path), steps_traced=2)
    assert result["wall_ms_per_step"] == 10.0
    assert result["ms_per_step"] == {"matmul": 5.0, "copies and transposes": 1.0, "other fusions": 2.5,
                                     "no thunk running": 1.5}
    text = cpu_bench.markdown({"cpu": cpu_bench.cpu_description(), "trace": result,
                               "gemms": {"rows": [], "step_gemm_ms": {"xla float32": 1.0}},
                               "variants": [{"variant": "default", "xla_flags": "", "overrides": [],
                                             "ms_per_iter": [1.0], "median_ms": 1.0, "vs_default": 1.0}]})
    assert "| no thunk running | 1.5 | 15% |" in text and "| default | `(none)` | 1.00 |" in text

    path.write_text(json.dumps({"traceEvents": events[3:]}))  # no thread names: no XLA thread
    assert "xprof_traceme" in cpu_bench.wall_breakdown(str(path), steps_traced=1)["error"]


def test_cpu_bench_a_failing_variant_is_a_row(monkeypatch):
    from haiku_gpt.benchmarks import cpu_bench

    def fake(config_path, overrides, iters, xla_flags, extra=()):
        if "bad" in xla_flags:
            raise RuntimeError("bench --what=train failed:\nUnknown flag in XLA_FLAGS: --bad")
        return {"ms_per_iter": 10.0 if not xla_flags else 5.0}

    monkeypatch.setattr(cpu_bench, "train_in_child", fake)
    rows = cpu_bench.step_variants("c.py", [], 1, 2, variants=(("default", "", ()), ("bad", "--bad", ()),
                                                                ("good", "--good", ())))
    assert rows[1]["error"] == "Unknown flag in XLA_FLAGS: --bad" and rows[1]["ms_per_iter"] == []
    assert rows[2]["ms_per_iter"] == [5.0, 5.0] and rows[2]["vs_default"] == 2.0
