"""The one exception type that reaches the user as a paragraph instead of a traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, data, checkpoint, prompt).

    The message is a complete paragraph that says what is wrong and names the
    fix (the flag or the command). `launch.py` prints it without a traceback
    and exits non-zero.
    """


def cudnn_missing(what: str, e: RuntimeError) -> Exception:
    """A UserError naming the fix when cuDNN is missing (JAX checks its version while tracing
    dot_product_attention(implementation="cudnn")); any other RuntimeError as it is.

    `what`: what failed, e.g. "preflight: the train step does not trace"."""
    if "cudnn" not in str(e).lower():
        return e
    return UserError(
        f"{what}: {str(e).strip()} attention_impl='cudnn' needs the cuDNN library where the step is traced and "
        "compiled (cuDNN builds its attention graph at compile time): install cuDNN 9 (`pip install "
        "nvidia-cudnn-cu13`), or check the config with --config.attention_impl=pallas.")
