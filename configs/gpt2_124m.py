"""GPT-2 small (124M) as nanoGPT's config/train_gpt2.py trains it on OpenWebText.

12 layers, 12 heads, 768 wide, block 1024, vocab 50304 (50257 padded to a multiple
of 64). Like nanoGPT's train.py, bias=False: nanoGPT prints 123.59M parameters for
this run (123.69M with --config.bias=True). Not meant to be trained on a CPU.
"""

from haiku_gpt.configs import base


def get_config():
    c = base.get_config()
    c.config_name = "gpt2_124m"
    c.out_dir = "out-gpt2-124m"
    c.dataset = "openwebtext"
    c.vocab_size = 50304
    c.batch_size = 12
    c.block_size = 1024
    c.gradient_accumulation_steps = 5 * 8
    c.max_iters = 600000
    c.lr_decay_iters = 600000
    c.eval_interval = 1000
    c.eval_iters = 200
    c.log_interval = 10
    c.weight_decay = 1e-1
    return c
