"""Autoregressive Transformer decoder with a key/value cache.

Official Pix2Seq layout (facts §5): token embedding E shared with the output
layer (logits = h · Eᵀ + b), learned position embedding, pre-LN layers of
causal self-attention, cross-attention to the image tokens and an MLP, and a
final LayerNorm. Embeddings and the output bias start truncated-normal with
standard deviation 0.02; dense layers Xavier uniform (see vit.py).

The same parameters serve two paths:
  * `__call__`: teacher forcing over a whole sequence with a causal mask.
  * `init_cache` + `step`: incremental decoding. Each layer's self-attention
    keys and values are projected once per token and written into a cache of
    fixed length; the image keys and values of the cross-attention are
    projected once per image by `init_cache`. (The official code cached the
    layer-normed inputs and re-projected all keys and values every step.)

Cache layout, one dict per layer (B batch, L cache length, N image tokens,
H heads, D head width):
  {"k", "v": float32[B, L, H, D], "cross_k", "cross_v": float32[B, N, H, D]}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unified_seq.loss import projected_cross_entropy
from unified_seq.models.vit import LN_EPS, Attention, MlpBlock, drop_path, remat

Cache = list[dict[str, jax.Array]]
embed_init = nn.initializers.truncated_normal(stddev=0.02)
EMBED_INITS = ("normal", "sincos")


def ordered_code_1d(count: int, width: int) -> np.ndarray:
    """float32[count, width]: sin-cos code of 0 … count-1, std 0.02 like embed_init.

    Frequencies run from 4 cycles over the whole range (neighbours differ,
    distant bins are far apart) down to nearly constant, so nearby indices
    get nearby vectors at every scale.
    """
    if width % 2:
        raise ValueError(f"the sin-cos code needs an even width, got {width}")
    angle = np.arange(count)[:, None] / count * 2 * np.pi * 4
    freq = 1.0 / 10000.0 ** (2 * np.arange(width // 2) / width)
    code = np.concatenate([np.sin(angle * freq), np.cos(angle * freq)], axis=1)
    return (code / code.std() * 0.02).astype(np.float32)


def token_embed_init(coord_range: tuple[int, int] | None) -> Callable[..., jax.Array]:
    """Normal init, with rows [start, start + count) set to `ordered_code_1d`.

    Coordinate tokens are ordered: bin 41 lies between 40 and 42. Untouched
    normal rows make the decoder learn that order before it can place a
    point inside a prompted box; starting from an ordered code it need not
    (README: segmentation AP 0.006 -> 0.138 in an 800-step probe).
    """
    if coord_range is None:
        return embed_init

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        start, count = coord_range
        if start + count > shape[0]:
            raise ValueError(f"coordinate rows [{start}, {start + count}) exceed vocab {shape[0]}")
        code = jnp.asarray(ordered_code_1d(count, shape[1]), dtype)
        return embed_init(key, shape, dtype).at[start : start + count].set(code)

    return init


@jax.custom_vjp
def add_output_bias(logits: jax.Array, bias: jax.Array) -> jax.Array:
    """`logits + bias` for float32[..., V] and float32[V].

    The same sum, with the bias gradient computed as a vector-matrix product
    (ones · g) instead of a sum over rows: XLA's CPU backend runs that
    [B·T, V] reduction as a slow loop (194 ms of a 0.9-s train step at
    V = 35000), the product in a few milliseconds.
    """
    return logits + bias


def _add_output_bias_fwd(logits: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    return logits + bias, None


def _add_output_bias_bwd(_: None, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = g.reshape(-1, g.shape[-1])
    return g, jnp.einsum("n,nv->v", jnp.ones(rows.shape[:1], rows.dtype), rows)


add_output_bias.defvjp(_add_output_bias_fwd, _add_output_bias_bwd)


def attention_mask(num_queries: int, num_keys: int, index: jax.Array | int) -> jax.Array:
    """bool[T, S]: query t (absolute position index + t) sees key slots ≤ its position.

    Teacher forcing is the case index = 0, S = T (a causal mask); a cached
    step also hides the not-yet-written cache slots beyond index + T - 1.
    """
    query_pos = index + jnp.arange(num_queries)
    return jnp.arange(num_keys)[None, :] <= query_pos[:, None]


class DecoderLayer(nn.Module):
    """x + DropPath(SelfAttn(LN x)); x + DropPath(CrossAttn(LN x, image)); x + DropPath(MLP)."""

    width: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    def setup(self):
        self.ln_self = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.self_attn = Attention(self.num_heads, self.width, self.dtype)
        self.ln_cross = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.cross_attn = Attention(self.num_heads, self.width, self.dtype)
        self.ln_mlp = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.mlp = MlpBlock(self.mlp_dim, self.dropout, self.dtype)
        self.skip = drop_path(self.drop_path)

    def cross_kv(self, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image keys and values: float32[B, N, W] → 2 × float32[B, N, H, D]."""
        return self.cross_attn.project_kv(encoded)

    def __call__(self, x: jax.Array, encoded: jax.Array, train: bool = False) -> jax.Array:
        """Teacher forcing: T tokens from position 0, the layer's whole training path.

        Args:
          x: float32[B, T, W] token states.
          encoded: float32[B, N, W] image tokens (projected here, so that
            `remat` recomputes the projection instead of keeping it).
          train: dropout and drop-path on; positional for `remat`.

        Returns:
          float32[B, T, W].
        """
        cross_k, cross_v = self.cross_kv(encoded)
        x, _ = self.step(x, cross_k, cross_v, train=train)
        return x

    def step(
        self,
        x: jax.Array,
        cross_k: jax.Array,
        cross_v: jax.Array,
        *,
        cache: dict[str, jax.Array] | None = None,
        index: jax.Array | int = 0,
        train: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Runs T tokens that start at absolute position `index`.

        Args:
          x: float32[B, T, W] token states.
          cross_k, cross_v: float32[B, N, H, D] projected image tokens.
          cache: {"k", "v": float32[B, L, H, D]} earlier keys and values, or
            None for teacher forcing over x alone (index must then be 0).
          index: position of x[:, 0]; int32 scalar, may be traced.
          train: dropout and drop-path on (needs a 'dropout' rng).

        Returns:
          (float32[B, T, W], {"k", "v"}: the cache with this chunk written in,
          or this chunk's own keys and values when cache is None).
        """
        deterministic = not train
        h = self.ln_self(x)
        q = self.self_attn.project_query(h)
        k, v = self.self_attn.project_kv(h)
        if cache is not None:
            start = (0, index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
        mask = attention_mask(x.shape[1], k.shape[1], index)
        x = x + self.skip(self.self_attn.attend(q, k, v, mask), deterministic=deterministic)
        q = self.cross_attn.project_query(self.ln_cross(x))
        h = self.cross_attn.attend(q, cross_k, cross_v)
        x = x + self.skip(h, deterministic=deterministic)
        h = self.mlp(self.ln_mlp(x), train=train)
        x = x + self.skip(h, deterministic=deterministic)
        return x, {"k": k, "v": v}


class Decoder(nn.Module):
    """Token decoder over a shared vocabulary.

    Attributes:
      vocab_size: V, rows of the shared embedding.
      max_len: longest sequence (prompt + answer) the position embedding covers.
      width, depth, mlp_dim, num_heads: Transformer sizes.
      dropout, drop_path: as in the encoder.
      coord_range: (first coordinate token, bins) to start from an ordered
        code (`token_embed_init`), or None for the official normal init.
      dtype: compute type; parameters and logits stay float32.
      remat: a `vit.REMAT_POLICIES` name, applied to every layer's teacher
        forcing (decoding with the cache does not differentiate).
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    coord_range: tuple[int, int] | None = None
    remat: str = "none"

    def setup(self):
        self.embed = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=token_embed_init(self.coord_range),
            dtype=self.dtype,
        )
        self.pos_embed = self.param("pos_embed", embed_init, (self.max_len, self.width))
        self.output_bias = self.param("output_bias", embed_init, (self.vocab_size,))
        layer = remat(DecoderLayer, self.remat, static_argnums=(3,))
        self.layers = [
            layer(
                self.width,
                self.mlp_dim,
                self.num_heads,
                self.dropout,
                self.drop_path,
                self.dtype,
            )
            for _ in range(self.depth)
        ]
        self.ln_out = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)

    def _inputs(self, tokens: jax.Array, index: jax.Array | int) -> jax.Array:
        pos = jax.lax.dynamic_slice_in_dim(self.pos_embed, index, tokens.shape[1])
        return self.embed(tokens) + pos.astype(self.dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        """float[..., W] → float32[..., V], LayerNorm(h) · Eᵀ + b.

        The product accumulates into float32 whatever the compute type: with
        bfloat16 the logits (and so the loss) keep float32 precision, and the
        [B, T, V] array is float32 either way.
        """
        x = self.ln_out(x)
        embedding = self.embed.embedding.astype(self.dtype)
        logits = jnp.einsum(
            "...w,vw->...v", x.astype(self.dtype), embedding, preferred_element_type=jnp.float32
        )
        return add_output_bias(logits, self.output_bias)

    def token_cross_entropy(
        self, x: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
    ) -> jax.Array:
        """float32[N]: cross-entropy of `logits(x)` float[N, W] against int32[N] targets.

        The same value as `loss.cross_entropy(self.logits(x), targets)`, with
        the output layer and the loss differentiated as one operation
        (`loss.projected_cross_entropy`), which a training step runs faster.
        """
        x = self.ln_out(x).astype(self.dtype)
        embedding = self.embed.embedding.astype(self.dtype)
        return projected_cross_entropy(x, embedding, self.output_bias, targets, label_smoothing)

    def __call__(self, tokens: jax.Array, encoded: jax.Array, *, train: bool) -> jax.Array:
        """Teacher-forced logits.

        Args:
          tokens: int32[B, T] decoder input (prompt + answer), T ≤ max_len.
          encoded: float32[B, N, W] image tokens at the decoder width.
          train: dropout and drop-path on (needs a 'dropout' rng).

        Returns:
          float32[B, T, V]: logits[:, t] predicts token t + 1.
        """
        return self.logits(self.hidden(tokens, encoded, train=train))

    def hidden(self, tokens: jax.Array, encoded: jax.Array, *, train: bool) -> jax.Array:
        """float[B, T, W]: the last layer's output, before `logits` (see `__call__`).

        Training projects only the positions its loss weighs (loss.py).
        """
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens > max_len {self.max_len}")
        x = self._inputs(tokens, 0)
        for layer in self.layers:
            x = layer(x, encoded, train)
        return x

    def init_cache(self, encoded: jax.Array, length: int) -> Cache:
        """Empty self-attention cache and the image keys/values, projected once.

        Args:
          encoded: float32[B, N, W] image tokens at the decoder width.
          length: L, cache slots = the most tokens that will be fed (≤ max_len).

        Returns:
          One dict per layer, see the module docstring.
        """
        if length > self.max_len:
            raise ValueError(f"cache length {length} > decoder max_len {self.max_len}")
        batch = encoded.shape[0]
        heads = (self.num_heads, self.width // self.num_heads)
        cache = []
        for layer in self.layers:
            cross_k, cross_v = layer.cross_kv(encoded)
            empty = jnp.zeros((batch, length, *heads), cross_k.dtype)
            cache.append({"k": empty, "v": empty, "cross_k": cross_k, "cross_v": cross_v})
        return cache

    def step(
        self, tokens: jax.Array, cache: Cache, index: jax.Array | int
    ) -> tuple[jax.Array, Cache]:
        """Feeds a chunk of tokens through the cache (inference only).

        Args:
          tokens: int32[B, t] at positions index … index + t - 1 (the whole
            prompt for a prefill, one token afterwards).
          cache: from `init_cache` or a previous step.
          index: int32 scalar, may be traced; index + t ≤ cache length.

        Returns:
          (float32[B, t, V] logits, each predicting the following token;
          the cache with the chunk's keys and values written in).
        """
        x = self._inputs(tokens, index)
        new_cache = []
        for layer, entry in zip(self.layers, cache, strict=True):
            x, kv = layer.step(x, entry["cross_k"], entry["cross_v"], cache=entry, index=index)
            new_cache.append({**entry, **kv})
        return self.logits(x), new_cache
