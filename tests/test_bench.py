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
