"""What `python launch.py` runs with no --config: shakespeare_char on a GPU/TPU, its CPU recipe otherwise."""

import jax

from configs import shakespeare_char, shakespeare_char_cpu


def get_config():
    backend = jax.default_backend()
    if backend == "cpu":
        c = shakespeare_char_cpu.get_config()
        c.config_name = "shakespeare_char_cpu (default: no GPU/TPU found)"
    else:
        c = shakespeare_char.get_config()
        c.config_name = f"shakespeare_char (default: {backend} found)"
    return c
