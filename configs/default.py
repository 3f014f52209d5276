"""What `python launch.py` runs with no --config: shakespeare_char on a GPU/TPU (bfloat16, as dtype=auto picks
there, and the Pallas kernel), its CPU recipe otherwise.

The platform is told from JAX_PLATFORMS and the device files, not by asking JAX: this file loads
while the flags are parsed, before `jax.distributed.initialize`, which must come before anything
that starts JAX's backend.
"""

from haiku_gpt.configs import shakespeare_char, shakespeare_char_cpu
from haiku_gpt.system import accelerator_platform


def get_config():
    platform = accelerator_platform()
    if platform == "cpu":
        c = shakespeare_char_cpu.get_config()
        c.config_name = "shakespeare_char_cpu (default: no GPU/TPU found)"
    else:
        c = shakespeare_char.get_config()
        c.attention_impl = "pallas"  # the fused kernel (with attention dropout, which cuDNN's lacks)
        c.config_name = f"shakespeare_char (default: {platform} found)"
    return c
