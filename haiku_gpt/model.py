"""GPT-2, exactly as nanoGPT's model.py has it, as Haiku modules.

Shape glossary:
  B: batch size            T: sequence length (<= block_size)
  C: n_embd (model width)  H: n_head    D: head dim = C // H
  KVH: key/value heads (n_kv_head; divides H, = H unless grouped-query attention)
  V: vocabulary size       L: n_layer   S: KV-cache length (= block_size)
  N: B * T (tokens flattened: every matmul sees a 2-D [N, C] operand, which
     XLA's CPU backend runs ~1.5x faster than the same matmul on [B, T, C])

Token + learned position embeddings, pre-LayerNorm blocks (attention then MLP,
each added to the residual stream), final LayerNorm, and an lm_head tied to the
token embedding. Dropout is seeded from Haiku's rng (`hk.next_rng_key`), so the
model is a pure function of (params, rng, tokens) after `hk.transform`.

Two options beyond nanoGPT, both off by default:
  - grouped-query attention (`n_kv_head` < n_head; 1 is multi-query attention): the fused c_attn
    projection is C + 2 KVH D wide ([q: H D | k: KVH D | v: KVH D]; with KVH = H exactly GPT-2's
    [C, 3C]), query head h attends with K/V head h // (H // KVH), and the KV cache holds KVH heads.
  - document masking: `segment_ids` [B, T] (`document_segment_ids`: the documents between
    end-of-text tokens) keep each position's attention inside its own document.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import chex
import haiku as hk
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from haiku_gpt import kernels
from haiku_gpt.loss import chunked_cross_entropy


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The model's shape: the subset of the run config the model needs."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int = 0  # key/value heads, a divisor of n_head (grouped-query attention); 0: n_head
    dropout: float = 0.0
    bias: bool = False
    attention_impl: str = "reference"
    kernel_family: str = "auto"  # attention_impl='pallas': its GPU kernels (kernels.families.KERNEL_FAMILIES)
    check_attention: bool = False
    remat: str = "none"  # REMAT_POLICIES: what the backward pass recomputes instead of storing
    loss_chunk_tokens: int = 0  # tokens per lm_head + cross-entropy chunk (haiku_gpt/loss.py); 0: automatic

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """KVH: the key/value heads (n_kv_head, or n_head when it is 0)."""
        return self.n_kv_head or self.n_head


# --config.remat: which of a block's activations the backward pass keeps (the rest it recomputes
# from the block's input): none -> all of them; block -> only the block's input (jax.checkpoint of
# the whole block); dots -> the outputs of its weight matmuls (qkv, the projections, the MLP: dots
# without batch dimensions), recomputing attention ([B, H, T, T] scores, softmax, dropout), the
# layer norms and the GELU.
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Keys and values for positions 0..S-1, one [B, KVH, S, D] array per layer (unwritten slots are masked).

    One buffer per layer, not a stacked [L, ...] array: each layer then reads and updates only its
    own buffer, which XLA keeps in place inside the decode loop (no per-token copy of the cache).
    """

    k: tuple[Float[Array, "B KVH S D"], ...]
    v: tuple[Float[Array, "B KVH S D"], ...]


def init_kv_cache(config: GPTConfig, batch_size: int, dtype=jnp.float32) -> KVCache:
    shape = (batch_size, config.kv_heads, config.block_size, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)))


def _normal(std: float) -> hk.initializers.Initializer:
    return hk.initializers.RandomNormal(stddev=std)


def _dropout(x: Array, rate: float, is_training: bool) -> Array:
    """Inverted dropout with hashed keep bits (`kernels.element_keep_mask`), seeded from Haiku's rng."""
    if is_training and rate > 0.0:
        seed = jax.random.bits(hk.next_rng_key(), dtype=jnp.uint32)
        keep = kernels.element_keep_mask(seed, x.shape, rate)
        return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    return x


# Vocabularies up to this size are looked up as a one-hot matmul. A gather's gradient is a scatter-add into
# the table, and with few rows (65 characters) every token's add collides on the same rows: on a GPU those
# atomics serialise (measured on an H200, bf16 shakespeare_char: 25.7 of a step's 30.9 ms of GPU time). The
# one-hot form's gradient is a GEMM, one_hot^T @ dx, and costs 2 N V C FLOPs: nothing at this size.
ONE_HOT_MAX_VOCAB = 1024


def _embed(table: Float[Array, "V C"], idx: Int[Array, "B T"]) -> Float[Array, "B T C"]:
    """Rows `idx` of `table`, exactly (the one-hot matmul at full precision: 1.0 x value, plus zeros)."""
    if table.shape[0] > ONE_HOT_MAX_VOCAB:
        return jnp.take(table, idx, axis=0)
    one_hot = jax.nn.one_hot(idx, table.shape[0], dtype=table.dtype)
    return jnp.dot(one_hot, table, precision=jax.lax.Precision.HIGHEST)


LAYER_NORM_EPS = 1e-5  # nanoGPT's and GPT-2's (Hugging Face's layer_norm_epsilon)


def _layer_norm(bias: bool, name: str) -> hk.LayerNorm:
    # nanoGPT's LayerNorm: eps 1e-5, weight always, bias only with config.bias.
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=bias, eps=LAYER_NORM_EPS, name=name)


def document_segment_ids(idx: Int[Array, "B T"], end_of_text: int) -> Int[Array, "B T"]:
    """Each position's document within its row: the count of `end_of_text` tokens strictly before it.

    The prepare scripts write an end-of-text token after each document, so the token after one starts
    a new segment and the end-of-text token itself belongs to the document it ends.
    """
    is_end = (idx == end_of_text).astype(jnp.int32)
    return jnp.cumsum(is_end, axis=-1) - is_end


class CausalSelfAttention(hk.Module):
    """Fused qkv projection, causal attention through `kernels.attention`, output projection."""

    def __init__(self, config: GPTConfig, name: str | None = None):
        super().__init__(name=name)
        self.config = config

    def __call__(
        self,
        x: Float[Array, "N C"],
        batch_size: int,
        is_training: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        positions: Int[Array, "T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "N C"], KVCache | None]:
        cfg = self.config
        n_tokens, width = x.shape
        seq = n_tokens // batch_size
        kv_width = cfg.kv_heads * cfg.head_dim
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2's scaled residual init
        # [q: H D | k: KVH D | v: KVH D]; with KVH = H exactly GPT-2's [C, 3C] c_attn.
        qkv = hk.Linear(width + 2 * kv_width, with_bias=cfg.bias, w_init=_normal(0.02), name="c_attn")(x)
        qkv = qkv.reshape(batch_size, seq, cfg.n_head + 2 * cfg.kv_heads, cfg.head_dim)  # [B, T, H + 2 KVH, D]
        q, k, v = kernels.split_qkv(qkv, cfg.kv_heads)  # [B, T, H, D], [B, T, KVH, D] x 2

        if cache is None:
            dropout_rate = cfg.dropout if is_training else 0.0
            seed = None
            if dropout_rate > 0.0:
                seed = jax.random.bits(hk.next_rng_key(), dtype=jnp.uint32)
            options = dict(impl=cfg.attention_impl, causal=True, dropout_rate=dropout_rate, dropout_seed=seed,
                           segment_ids=segment_ids, kernel_family=cfg.kernel_family)
            if cfg.check_attention:  # --config.check_attention: chex against the reference
                y = kernels.cross_checked_attention(q, k, v, layer=self.module_name, **options)
            else:  # pallas reads q, k and v out of qkv: XLA copies none of them out
                y = kernels.attention_qkv(qkv, cfg.kv_heads, **options)
        else:
            # Decoding: write this step's keys/values at their positions of this layer's
            # cache (in place: only T positions are written), then attend over the cache.
            def write(buffers, new):
                new = new.transpose(0, 2, 1, 3).astype(buffers[layer].dtype)  # [B, KVH, T, D]: heads-major
                updated = jax.lax.dynamic_update_slice_in_dim(buffers[layer], new, positions[0], axis=2)
                return buffers[:layer] + (updated,) + buffers[layer + 1:]
            cache = KVCache(write(cache.k, k), write(cache.v, v))
            y = kernels.cached_attention(q, cache.k[layer].astype(q.dtype), cache.v[layer].astype(q.dtype),
                                         positions)

        y = y.reshape(n_tokens, width)
        y = hk.Linear(width, with_bias=cfg.bias, w_init=_normal(std_proj), name="c_proj")(y)
        return _dropout(y, cfg.dropout, is_training), cache


# tanh-GELU whose backward recomputes its tanh from the input: the forward writes only its output, where
# autodiff also wrote the tanh ([N, 4C]) for the backward to read back (2 x N x 4C fewer bytes a layer).
_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=True))


class MLP(hk.Module):
    """c_fc (4x wider) -> tanh-GELU -> c_proj -> dropout."""

    def __init__(self, config: GPTConfig, name: str | None = None):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x: Float[Array, "N C"], is_training: bool) -> Float[Array, "N C"]:
        cfg = self.config
        std_proj = 0.02 / math.sqrt(2 * cfg.n_layer)
        h = hk.Linear(4 * cfg.n_embd, with_bias=cfg.bias, w_init=_normal(0.02), name="c_fc")(x)
        h = _gelu(h)
        h = hk.Linear(cfg.n_embd, with_bias=cfg.bias, w_init=_normal(std_proj), name="c_proj")(h)
        return _dropout(h, cfg.dropout, is_training)


class Block(hk.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, name: str | None = None):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x, batch_size, is_training, cache=None, layer=0, positions=None, segment_ids=None):
        attn_out, cache = CausalSelfAttention(self.config, name="attn")(
            _layer_norm(self.config.bias, "ln_1")(x), batch_size, is_training, cache, layer, positions, segment_ids)
        x = x + attn_out
        x = x + MLP(self.config, name="mlp")(_layer_norm(self.config.bias, "ln_2")(x), is_training)
        return x, cache


class GPT(hk.Module):
    """The whole model: tokens in, next-token logits out (and an updated KV cache when decoding)."""

    def __init__(self, config: GPTConfig, name: str = "gpt"):
        super().__init__(name=name)
        self.config = config

    @hk.experimental.name_like("__call__")  # the parameters keep __call__'s names (gpt/wte, gpt/h_0/...)
    def features(
        self,
        idx: Int[Array, "B T"],
        is_training: bool = False,
        cache: KVCache | None = None,
        start: Int[Array, ""] | int = 0,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "N C"], Float[Array, "V C"], KVCache | None]:
        """The final LayerNorm's output for every position, the (tied) token embedding, the cache.

        `segment_ids` (document masking, see `document_segment_ids`): attention stays within each
        position's segment. Positions stay those of the row (0..T-1), as nanoGPT's are.
        """
        cfg = self.config
        batch_size, seq = idx.shape
        chex.assert_rank(idx, 2)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids apply to training and evaluation only: decoding with a KV cache "
                             "continues one document, so pass segment_ids=None with a cache")
        wte = hk.Embed(cfg.vocab_size, cfg.n_embd, w_init=_normal(0.02), name="wte")
        wpe = hk.get_parameter("wpe", [cfg.block_size, cfg.n_embd], init=_normal(0.02))
        positions = jnp.arange(seq) + start
        x = _embed(wte.embeddings, idx) + jax.lax.dynamic_slice_in_dim(wpe, start, seq)[None]
        x = _dropout(x, cfg.dropout, is_training).reshape(batch_size * seq, cfg.n_embd)

        for i in range(cfg.n_layer):  # unrolled: faster than hk.layer_stack on CPU
            block = Block(cfg, name=f"h_{i}")
            if cfg.remat == "none" or cache is not None:  # decoding has no backward pass
                x, cache = block(x, batch_size, is_training, cache, i, positions, segment_ids)
            else:
                x = hk.remat(lambda h, p, s: block(h, batch_size, is_training, None, i, p, s)[0],
                             policy=REMAT_POLICIES[cfg.remat])(x, positions, segment_ids)
        return _layer_norm(cfg.bias, "ln_f")(x), wte.embeddings, cache

    def __call__(
        self,
        idx: Int[Array, "B T"],
        is_training: bool = False,
        cache: KVCache | None = None,
        start: Int[Array, ""] | int = 0,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T V"], KVCache | None]:
        """Logits for every position; with `cache`, the tokens sit at positions start..start+T-1."""
        x, embeddings, cache = self.features(idx, is_training, cache, start, segment_ids)
        # Tied lm_head: logits against the token embedding, accumulated in float32.
        logits = jnp.dot(x, embeddings.T.astype(x.dtype), preferred_element_type=jnp.float32)
        return logits.reshape(*idx.shape, self.config.vocab_size), cache

    @hk.experimental.name_like("__call__")
    def loss(self, idx: Int[Array, "B T"], targets: Int[Array, "B T"], is_training: bool,
             segment_ids: Int[Array, "B T"] | None = None) -> Float[Array, ""]:
        """Mean next-token cross-entropy, through the chunked lm_head (haiku_gpt/loss.py): the [B T, V]
        logits never exist at once, and their GEMMs run in the compute dtype."""
        x, embeddings, _ = self.features(idx, is_training, segment_ids=segment_ids)
        return chunked_cross_entropy(x, embeddings, targets.reshape(-1), self.config.loss_chunk_tokens)


def mask_padding(logits: Float[Array, "... V"], valid_vocab: int) -> Float[Array, "... V"]:
    """Logits with the padded embedding rows past `valid_vocab` (BPE's 50257 padded to 50304) set to -inf:
    they are not tokens, so they are never sampled nor share the softmax."""
    if valid_vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)


def make_model(config: GPTConfig) -> hk.Transformed:
    """`init(rng, idx)` / `apply(params, rng, idx, is_training, cache, start, segment_ids)` -> (logits, cache) for
    the GPT; `apply(params, rng, idx, is_training, segment_ids=..., targets=targets)` -> the mean cross-entropy
    loss (nanoGPT's `model(idx, targets)`)."""

    def forward(idx, is_training=False, cache=None, start=0, segment_ids=None, targets=None):
        if targets is not None:  # training and evaluation: the loss, never the whole logits
            return GPT(config).loss(idx, targets, is_training, segment_ids)
        return GPT(config)(idx, is_training, cache, start, segment_ids)

    return hk.transform(forward)
