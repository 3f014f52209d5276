"""nanoGPT's config/finetune_shakespeare.py: GPT-2 XL finetuned on tiny Shakespeare (GPT-2 BPE).

The model's shape comes from the pretrained checkpoint (48 layers, 25 heads, 1600 wide, bias, 50257
tokens, 1558M parameters; see haiku_gpt/pretrained.py); block_size stays at its 1024 positions.
Prepare the data with `python data/shakespeare/prepare.py`. Afterwards sample the finetuned model with
`--mode=sample --config.init_from=resume` (with init_from='gpt2-xl', --mode=sample samples the
pretrained GPT-2 XL itself). A smaller start: --config.init_from=gpt2.
"""

from haiku_gpt.configs import base


def get_config():
    c = base.get_config()
    c.config_name = "finetune_shakespeare"
    c.out_dir = "out-shakespeare"
    c.eval_interval = 5
    c.eval_iters = 40
    c.dataset = "shakespeare"
    c.init_from = "gpt2-xl"  # the largest GPT-2
    # only save checkpoints if the validation loss improves
    c.always_save_checkpoint = False
    # the number of examples per iter: 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter;
    # shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
    c.batch_size = 1
    c.gradient_accumulation_steps = 32
    c.max_iters = 20
    # finetune at a constant learning rate
    c.learning_rate = 3e-5
    c.decay_lr = False
    c.sample.start = "ROMEO:"
    return c
