"""haiku_gpt's command line: train, sample, evaluate, check a config, or export to Hugging Face.

  python launch.py --config=configs/shakespeare_char.py [--config.field=value ...] [--mode=train]
  rax run launch.py --config=configs/shakespeare.py

Only `main` and `_private` helpers live here: `rax run` wraps every other
top-level function of the script with shape checking, and the work belongs in
the `haiku_gpt` package anyway.
"""

import os
import signal
import sys

from haiku_gpt.system import set_up_process

# Before JAX starts: JAX_PLATFORMS=cpu on a machine with no GPU or TPU, and on the CPU glibc's allocator
# tuned before JAX allocates anything (haiku_gpt/system.py).
set_up_process()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0]))


def _unknown_field(e):
    """The paragraph for a --config.<field> the config lacks (ml_collections' KeyError or AttributeError)."""
    key_error = e if isinstance(e, KeyError) else e.__context__
    detail = str(key_error.args[0] if key_error is not None and key_error.args else e)
    return (f"unknown config field {detail.replace(chr(10), '; ')}: check the spelling of the "
            "--config.<field> flag (every field is listed, with its default, in configs/base.py).")


def _exit_with(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _define_config_flag():
    """--config, default configs/default.py. ml_collections applies --config.<field> overrides to the default
    file while defining the flag, so an unknown field given without --config fails here, not in the parser."""
    try:
        return config_flags.DEFINE_config_file(
            "config", os.path.join(_HERE, "configs", "default.py"),
            "Path to a config file (configs/*.py); override fields with --config.<field>=<value>.",
            lock_config=True)
    except (AttributeError, KeyError) as e:
        _exit_with(f"{_unknown_field(e)} Run `python launch.py --helpfull` for the flags.")


_CONFIG = _define_config_flag()
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "sample", "eval", "check", "export"],
    "train: train (or resume) a model; sample: generate text from out_dir's checkpoint; "
    "eval: loss/HellaSwag (--config.eval_task) of out_dir's checkpoint; check: the preflight only (shapes, "
    "parameters, FLOPs and memory of the train step against the device's), printed as a table; export: out_dir's "
    "checkpoint as Hugging Face GPT-2 (config.json + model.safetensors) in --config.export_dir (default out_dir/hf).")
# Multi-host training (jax.distributed). Left out: taken from a cluster launcher when there is one
# (SLURM, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS), else this is a single-process run.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host: HOST:PORT of process 0, the same on every process (with --num_processes, --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes take part.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.")


def _start_processes():
    """jax.distributed first, before JAX touches a device (a no-op for a single-process run)."""
    from haiku_gpt import distributed  # noqa: PLC0415

    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _parse_flags(argv):
    """absl's parser, with a one-paragraph error instead of a traceback for a bad --config."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:  # ml_collections: a --config.<field> the config lacks
        message = _unknown_field(e)
    except Exception as e:  # noqa: BLE001 (a config file that is missing or fails to load)
        message = _config_file_problem(e)
    _exit_with(f"{message} Run `python launch.py --helpfull` for the flags.")


def _config_file_problem(e):
    last_line = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
    return (f"cannot load the config file given by --config ({last_line}): pass one of configs/*.py, "
            "e.g. --config=configs/shakespeare_char.py.")


def main(argv):
    from haiku_gpt.errors import UserError  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)  # JAX's backend probing is not news to a user
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --flag")
    try:
        config = _CONFIG.value
        config.get("config_name")  # a config file that failed to load raises on first access
    except Exception as e:  # noqa: BLE001 (ml_collections loads the file lazily)
        _exit_with(_config_file_problem(e))
    try:
        _start_processes()
        from haiku_gpt import modes  # noqa: PLC0415 (imports JAX: after jax.distributed starts)

        code = modes.run(_MODE.value, config)
        if code:  # a training run stopped by Ctrl-C/SIGTERM, its checkpoint saved: not a finished run
            sys.exit(code)
    except UserError as e:
        # Every writer has closed on the way out (checkpoints written, metrics flushed). Exit at once:
        # threads still finishing abandoned work (orbax's reads of a damaged checkpoint) would otherwise
        # print their own errors while the interpreter shuts down.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and stops itself), or a second one
        print(f"interrupted (--mode={_MODE.value}): stopped without saving the current state (checkpoints "
              "written before stay as they were).", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGINT)
    finally:
        if config.check_attention:  # settle chex's jitted attention checks before exiting
            import chex  # noqa: PLC0415
            chex.block_until_chexify_assertions_complete()


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
