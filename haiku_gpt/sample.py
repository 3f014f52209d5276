"""Text generation with a KV cache, in one jitted decode loop.

nanoGPT's `generate` re-runs the model over the whole (cropped) context for
every new token. Here the prompt is run once (prefill) and each new token
costs one position: its keys and values are written into a fixed-size cache
of `block_size` slots and attention reads the cache (`kernels.cached_attention`).

Past the context window positions shift, so nanoGPT's semantics (the next
token sees the last `block_size` tokens at positions 0..block_size-1) need the
whole window recomputed per token: `window="exact"` (the default) does exactly
that. `window="half"` is the faster approximation: when the cache is full it
is refilled from the most recent half window and cached decoding continues.
"""

from __future__ import annotations

import dataclasses
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from haiku_gpt import pretrained
from haiku_gpt.config import validate_sample
from haiku_gpt.errors import UserError
from haiku_gpt.experiment import Experiment
from haiku_gpt.model import GPTConfig, init_kv_cache, make_model, mask_padding


def _next_token(key, logits: Float[Array, "B V"], temperature: float, top_k: int, valid_vocab: int):
    """Sample from softmax(logits / temperature) restricted to the top_k tokens (nanoGPT's rule)."""
    logits = mask_padding(logits.astype(jnp.float32), valid_vocab) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "config", "max_new_tokens", "temperature", "top_k", "valid_vocab", "window", "use_cache"))
def generate_tokens(
    params: hk.Params,
    context: Int[Array, "B P"],
    key: jax.Array,
    *,
    config: GPTConfig,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    valid_vocab: int | None = None,
    window: str = "exact",
    use_cache: bool = True,
) -> Int[Array, "B total"]:  # total = P + max_new_tokens (jaxtyping cannot name an int argument)
    """Append max_new_tokens sampled tokens to `context` (P <= block_size; crop longer prompts first).

    `use_cache=False` is nanoGPT's full recompute per token (over a padded window), kept
    as the benchmark baseline and as the definition the cached path is tested against.
    """
    # chex's value checks (check_attention) only run inside chexify'd training/eval steps.
    model = make_model(dataclasses.replace(config, check_attention=False))
    batch, prompt_len = context.shape
    block = config.block_size
    valid_vocab = valid_vocab or config.vocab_size
    assert prompt_len <= block, "crop the prompt to block_size before calling generate_tokens"
    total = prompt_len + max_new_tokens
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(context)
    keys = jax.random.split(key, max_new_tokens)

    def forward(idx, cache=None, start=0):
        return model.apply(params, None, idx, False, cache, start)

    def window_logits(tokens, n):
        """nanoGPT: logits of the last of the most recent min(n, block) tokens, recomputed."""
        start = jnp.maximum(n - block, 0)
        window_tokens = jax.lax.dynamic_slice_in_dim(tokens, start, min(block, total), axis=1)
        logits, _ = forward(window_tokens)
        return jax.lax.dynamic_index_in_dim(logits, n - 1 - start, axis=1, keepdims=False)

    if not use_cache:
        def body(i, tokens):
            n = prompt_len + i
            token = _next_token(keys[i], window_logits(tokens, n), temperature, top_k, valid_vocab)
            return jax.lax.dynamic_update_index_in_dim(tokens, token, n, axis=1)
        return jax.lax.fori_loop(0, max_new_tokens, body, tokens)

    # Prefill: positions 0..P-1 go into the cache, the last logits give token P.
    cache = init_kv_cache(config, batch)
    logits, cache = forward(context, cache, 0)
    tokens = tokens.at[:, prompt_len].set(_next_token(keys[0], logits[:, -1], temperature, top_k, valid_vocab))
    refill_len = max(block // 2, 1)

    def body(i, carry):
        # Invariant: `filled` cache slots hold the tokens just before the newest one, tokens[n-1].
        tokens, cache, filled = carry
        n = prompt_len + i  # tokens generated so far end at index n - 1

        if window == "half":
            def refill(cache):
                recent = jax.lax.dynamic_slice_in_dim(tokens, n - 1 - refill_len, refill_len, axis=1)
                _, cache = forward(recent, cache, 0)
                return cache, jnp.int32(refill_len)
            cache, filled = jax.lax.cond(filled >= block, refill, lambda c: (c, filled), cache)

        def cached(cache):
            newest = jax.lax.dynamic_slice_in_dim(tokens, n - 1, 1, axis=1)
            logits, cache = forward(newest, cache, filled)
            return logits[:, -1], cache, filled + 1

        def recompute(cache):  # window full, exact semantics: positions shift every token
            return window_logits(tokens, n), cache, filled

        if window == "exact" and total <= block:  # never past the window: no recompute branch to compile
            logits, cache, filled = cached(cache)
        else:
            logits, cache, filled = jax.lax.cond(filled < block, cached, recompute, cache)
        token = _next_token(keys[i], logits, temperature, top_k, valid_vocab)
        return jax.lax.dynamic_update_index_in_dim(tokens, token, n, axis=1), cache, filled

    tokens, _, _ = jax.lax.fori_loop(1, max_new_tokens, body, (tokens, cache, jnp.int32(prompt_len)))
    return tokens


def read_prompt(start: str) -> str:
    """`config.sample.start`: the text itself, or FILE:path to read it from a file (as nanoGPT)."""
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt file {path!r} given by --config.sample.start=FILE:{path} "
                            f"({e.strerror}): check the path, or pass the prompt text directly.") from None
    return start


def sample_from_checkpoint(exp: Experiment) -> list[str]:
    """--mode=sample: load out_dir's checkpoint (or init_from's pretrained GPT-2), generate, print."""
    config, s = exp.config, exp.config.sample
    validate_sample(config, exp.valid_vocab)
    if pretrained.is_pretrained(config.init_from):  # nanoGPT's sample.py with init_from='gpt2*'
        params = exp.pretrained_params()
        source = (f"pretrained {config.init_from} (--config.init_from=resume samples from "
                  f"{config.out_dir}'s checkpoint instead)")
    else:
        state, meta = exp.restore()
        params, source = state.params, f"step {meta['step']} of {config.out_dir}"
    prompt_ids = exp.tokenizer.encode(read_prompt(s.start))
    if not prompt_ids:
        raise UserError("the prompt --config.sample.start is empty after encoding: give at least one character.")
    context = np.asarray(prompt_ids[-config.block_size:], np.int32)  # nanoGPT crops to the window too
    context = np.broadcast_to(context, (s.num_samples, len(context)))
    exp.log(f"sampling {s.num_samples} x {s.max_new_tokens} tokens from {source}")
    tokens = generate_tokens(
        params, context, jax.random.PRNGKey(s.seed), config=exp.steps.model_config,
        max_new_tokens=s.max_new_tokens, temperature=float(s.temperature), top_k=int(s.top_k or 0),
        valid_vocab=exp.valid_vocab, window=s.window)
    prefix = prompt_ids[:-config.block_size] if len(prompt_ids) > config.block_size else []
    texts = [exp.tokenizer.decode(prefix + row.tolist()) for row in np.asarray(tokens)]
    for text in texts if exp.is_main else ():  # several processes: each samples the same, process 0 prints
        print(text)
        print("-" * 17, flush=True)
    return texts
