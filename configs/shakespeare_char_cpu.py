"""nanoGPT's CPU recipe for shakespeare_char (README: "I only have a macbook"): 4/4/128, block 64.

nanoGPT: python train.py config/train_shakespeare_char.py --device=cpu --compile=False
  --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
  --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
"""

from haiku_gpt.configs import shakespeare_char


def get_config():
    c = shakespeare_char.get_config()
    c.config_name = "shakespeare_char_cpu"
    c.out_dir = "out-shakespeare-char-cpu"
    c.eval_iters = 20
    c.log_interval = 1
    c.block_size = 64
    c.batch_size = 12
    c.n_layer = 4
    c.n_head = 4
    c.n_embd = 128
    c.max_iters = 2000
    c.lr_decay_iters = 2000
    c.dropout = 0.0
    return c
