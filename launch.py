"""haiku_gpt's command line: train, sample, evaluate, or check a config.

  python launch.py --config=configs/shakespeare_char.py [--config.field=value ...] [--mode=train]
  rax run launch.py --config=configs/shakespeare.py

Only `main` and `_private` helpers live here: `rax run` wraps every other
top-level function of the script with shape checking, and the work belongs in
the `haiku_gpt` package anyway.
"""

import os
import sys

from haiku_gpt.system import tune_allocator

tune_allocator()  # before JAX allocates anything (see haiku_gpt/system.py)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0]))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Path to a config file (configs/*.py); override fields with --config.<field>=<value>.",
    lock_config=True)
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "eval"],
    "train: train (or resume) a model; sample: generate text from out_dir's checkpoint; "
    "eval: train/val loss of out_dir's checkpoint.")


def _run(mode, config):
    from haiku_gpt import prepare, sample, train  # noqa: PLC0415 (after flags are parsed)

    print(f"config: {config.config_name}; mode: {mode}", flush=True)
    if mode == "train":
        prepare.ensure_prepared(os.path.join(config.data_dir, config.dataset), config.dataset)
        summary = train.train(config)
        if "ms_per_iter_median" in summary:
            print(f"done: step {summary['step']}, val loss {summary.get('val_loss', float('nan')):.4f}, "
                  f"median {summary['ms_per_iter_median']:.2f} ms/iter, mfu {summary['mfu_median'] * 100:.1f}%")
    elif mode == "sample":
        sample.sample_from_checkpoint(config)
    elif mode == "eval":
        train.evaluate_checkpoint(config)


def main(argv):
    from haiku_gpt.errors import UserError  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --flag")
    try:
        _run(_MODE.value, _CONFIG.value)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
