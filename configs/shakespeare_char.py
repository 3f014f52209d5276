"""nanoGPT's config/train_shakespeare_char.py: a baby GPT (6/6/384, block 256) on characters."""

from haiku_gpt.configs import base


def get_config():
    c = base.get_config()
    c.config_name = "shakespeare_char"
    c.out_dir = "out-shakespeare-char"
    c.eval_interval = 250  # frequent, because it overfits
    c.eval_iters = 200
    c.log_interval = 10
    c.always_save_checkpoint = False  # only save when val improves
    c.dataset = "shakespeare_char"
    c.gradient_accumulation_steps = 1
    c.batch_size = 64
    c.block_size = 256
    c.n_layer = 6
    c.n_head = 6
    c.n_embd = 384
    c.attention_impl = "blocked"  # the reference's numbers, ~25% less attention time at block 256 on CPU
    c.dropout = 0.2
    c.learning_rate = 1e-3  # a baby network can take a higher rate
    c.max_iters = 5000
    c.lr_decay_iters = 5000
    c.min_lr = 1e-4
    c.beta2 = 0.99  # a bit bigger, because few tokens per iteration
    c.warmup_iters = 100
    # nanoGPT samples with top_k=200, which keeps all 65 characters: say so (0: no filtering),
    # since a top_k larger than the vocabulary is rejected as a likely mistake.
    c.sample.top_k = 0
    return c
