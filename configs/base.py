"""Every field a run understands, with nanoGPT's names and defaults.

The other config files start from `base.get_config()` and change what their
recipe changes, so `--config.some_field=...` works the same for all of them
and an unknown field is rejected by ml_collections (the config is locked).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.config_name = "base"
    # I/O
    c.out_dir = "out"
    c.eval_interval = 2000
    c.log_interval = 1
    c.eval_iters = 200
    c.eval_only = False
    c.eval_task = "loss"  # --mode=eval: 'loss' (train/val loss) | 'hellaswag' (haiku_gpt/hellaswag.py)
    c.hellaswag_path = ""  # HellaSwag's val jsonl; '': data_dir/hellaswag/hellaswag_val.jsonl, downloaded once
    c.hellaswag_limit = 0  # score only the first N examples (0: all 10,042)
    c.always_save_checkpoint = True
    c.init_from = "scratch"  # 'scratch' | 'resume'
    c.keep_checkpoints = 3
    c.tensorboard = True  # TensorBoard event files in out_dir, beside metrics.jsonl
    c.wandb_log = False  # wandb logging (pip install wandb; WANDB_MODE=offline works without a network)
    c.wandb_project = "owt"
    c.wandb_run_name = "gpt2"
    # data
    c.data_dir = "data"  # datasets live in data_dir/dataset/{train,val}.bin + meta.json
    c.dataset = "openwebtext"
    c.document_mask = False  # attend only within each document (split at <|endoftext|>; GPT-2 BPE datasets only)
    c.gradient_accumulation_steps = 1
    c.batch_size = 12
    c.block_size = 1024
    # model
    c.n_layer = 12
    c.n_head = 12
    c.n_embd = 768
    c.n_kv_head = 0  # key/value heads: 0 = n_head (GPT-2); a divisor of n_head = grouped-query attention (1: MQA)
    c.dropout = 0.0
    c.bias = False
    c.vocab_size = 0  # 0: from the dataset's meta.json (BPE 50257 is padded to 50304)
    c.attention_impl = "reference"  # 'reference' | 'blocked' (fastest on CPU) | 'xla' | 'cudnn' (GPU) | 'pallas'
    c.kernel_family = "auto"  # pallas's GPU kernels: 'auto' (Triton) | 'mosaic_gpu' (Hopper, opt-in: docs/kernels.md)
    c.check_attention = False  # run the reference beside attention_impl and chex-compare
    c.remat = "none"  # 'none' | 'block' (recompute each block in the backward pass) | 'dots' (keep matmul outputs)
    c.loss_chunk_tokens = 0  # lm_head + cross-entropy over chunks of this many tokens (0: chunks of <= 512 MiB of logits)
    # AdamW
    c.learning_rate = 6e-4
    c.max_iters = 600000
    c.weight_decay = 1e-1
    c.beta1 = 0.9
    c.beta2 = 0.95
    c.grad_clip = 1.0  # 0 disables clipping
    c.skip_spikes = False  # skip an update whose loss or grad norm is > spike_z std devs above the recent mean
    c.spike_window = 128  # accepted steps the mean and std are taken over (llm.c's OutlierDetector window)
    c.spike_z = 5.0
    # learning-rate schedule
    c.decay_lr = True  # False: learning_rate at every step
    c.lr_schedule = "cosine"  # 'cosine' (nanoGPT's) | 'wsd' (warmup-stable-decay) | 'constant' (after warmup)
    c.warmup_iters = 2000
    c.lr_decay_iters = 600000  # cosine and wsd reach min_lr here
    c.min_lr = 6e-5
    c.wsd_decay_fraction = 0.2  # wsd: decay over this final fraction of lr_decay_iters - warmup_iters
    c.wsd_decay_shape = "linear"  # wsd: 'linear' | '1-sqrt'
    # system
    c.seed = 1337
    c.dtype = "auto"  # compute dtype: 'auto' (bfloat16 on a GPU/TPU, float32 on the CPU) | 'float32' | 'bfloat16'
    # (params stay float32)
    c.fsdp = False  # several devices: shard params + optimizer state over them (ZeRO-3), not replicate
    c.peak_flops = 0.0  # per device, for MFU; 0: the datasheet's dense peak for the device and dtype, else measured
    c.profile_steps = ""  # 'START,STOP': a jax.profiler trace of those steps in out_dir/profile
    c.steps_per_call = 1  # optimizer steps per jitted call (lax.scan over prefetched batches)
    c.target = ""  # --mode=check only: compile for hardware that is not here, e.g. 'h100x8', 'tpu-v5e:2x4'
    c.cpu_matmul_library = "auto"  # XLA:CPU matmuls: 'auto' | 'ynnpack' (small models) | 'eigen' (large)
    # export (--mode=export): out_dir's checkpoint as Hugging Face GPT-2 (config.json + model.safetensors)
    c.export_dir = ""  # '': out_dir/hf
    # sampling (--mode=sample)
    c.sample = ml_collections.ConfigDict()
    c.sample.start = "\n"  # text, or FILE:path to read the prompt from a file
    c.sample.num_samples = 10
    c.sample.max_new_tokens = 500
    c.sample.temperature = 0.8
    c.sample.top_k = 200
    c.sample.seed = 1337
    c.sample.window = "exact"  # past block_size: 'exact' (nanoGPT: recompute) | 'half' (refill cache)
    return c
