"""What each mode of launch.py does with its config: train, sample, eval, check or export.

`run(mode, config)` is launch.py's work once the flags are parsed (and `jax.distributed` has
started): one `setup(config)` for every mode (experiment.py), then the mode's own module.
"""

from __future__ import annotations

import os
import signal

import ml_collections

from haiku_gpt import distributed, evaluate, export, preflight, prepare, pretrained, sample, train
from haiku_gpt.config import attention_desc, resolved
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import setup


def run(mode: str, config: ml_collections.ConfigDict) -> int:
    """Run `mode`; returns the process's exit code (128 + the signal when a signal stopped training).
    Bad input raises UserError, whose message launch.py prints as one paragraph."""
    if config.target and mode != "check":
        raise UserError(f"--config.target={config.target} compiles for hardware that is not here, so it "
                        f"works only with --mode=check (not --mode={mode}); drop it to {mode} on this machine.")
    mesh = preflight.target_mesh(config)  # --config.target: its compile-only devices (None otherwise)
    chosen = resolved(config, mesh)  # --config.dtype=auto: bfloat16 on a GPU/TPU, float32 on the CPU
    if distributed.is_main_process():  # several processes: only process 0 prints
        auto = " (auto)" if chosen.dtype != config.dtype else ""
        print(f"config: {config.config_name}; mode: {mode}; {_devices(config)}; dtype {chosen.dtype}{auto}; "
              f"attention {attention_desc(config)}", flush=True)
    config = chosen
    with_dataset = needs_dataset(mode, config)
    if with_dataset and mode in ("train", "check"):
        prepare.ensure_prepared(os.path.join(config.data_dir, config.dataset), config.dataset)
    exp = setup(config, with_dataset=with_dataset, mesh=mesh)  # built once, for every mode
    if mode == "check":
        preflight.check_compiled(exp)
    elif mode == "sample":
        sample.sample_from_checkpoint(exp)
    elif mode == "eval":
        evaluate.evaluate_checkpoint(exp)
    elif mode == "export":
        export.export_checkpoint(exp)
    else:
        preflight.check_shapes(exp)  # shapes and memory first: a run that cannot work is refused here
        summary = train.train(exp)
        if "ms_per_iter_median" in summary and exp.is_main:
            print(f"done: step {summary['step']}, val loss {summary.get('val_loss', float('nan')):.4f}, "
                  f"median {summary['ms_per_iter_median']:.2f} ms/iter, mfu {summary['mfu_median'] * 100:.1f}%")
        if summary.get("interrupted"):
            return 128 + int(getattr(signal.Signals, str(summary["interrupted"]), signal.SIGINT))
    return 0


def _devices(config: ml_collections.ConfigDict) -> str:
    """What the run runs on, for the first line: '1 x NVIDIA H200 (gpu)', or the compile-only target."""
    if config.target:
        return f"compiling for {config.target}"
    import jax  # noqa: PLC0415

    return f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})"


def needs_dataset(mode: str, config: ml_collections.ConfigDict) -> bool:
    """Whether the mode reads the dataset: not to sample a pretrained GPT-2 as it is or score it on
    HellaSwag, nor to compile for a target with --config.vocab_size given."""
    if mode == "sample" or (mode == "eval" and config.eval_task == "hellaswag"):
        return not pretrained.is_pretrained(config.init_from)
    return not (mode == "check" and config.target and config.vocab_size)
