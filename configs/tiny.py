"""A tiny debug config for the tests: 2/2/32, block 16 (attention cross-checking off, as by default)."""

from haiku_gpt.configs import shakespeare_char_cpu


def get_config():
    c = shakespeare_char_cpu.get_config()
    c.config_name = "tiny"
    c.out_dir = "out-tiny"
    c.n_layer = 2
    c.n_head = 2
    c.n_embd = 32
    c.block_size = 16
    c.batch_size = 4
    c.max_iters = 20
    c.lr_decay_iters = 20
    c.warmup_iters = 2
    c.eval_interval = 10
    c.eval_iters = 2
    c.log_interval = 5
    c.check_attention = False  # the cross-check has its own tests (test_attention_dispatch, test_train)
    c.peak_flops = 1e11
    c.sample.num_samples = 2
    c.sample.max_new_tokens = 20
    return c
