"""Image encoder + bridge + token decoder: the Pix2Seq v2 model.

    model = build_model(config.model, vocab_size, max_len)     # models/sizes.py
    logits, extras = model.apply(variables, images, tokens, train=False)
    encoded = model.apply(variables, images, method=model.encode)

Captioning batches carry C sequences per image: tokens int32[B, C, T] share
one encoding per image and give logits float32[B, C, T, V].
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unified_seq.models.decoder import Cache, Decoder
from unified_seq.models.vit import (
    LN_EPS,
    Encoder,
    MlpBlock,
    dense_init,
    drop_path,
    posemb_sincos_2d,
)


class Bridge(nn.Module):
    """Encoder grid → decoder width (official dec_proj_mode 'mlp').

    Dense → LN → + 2-D sin-cos code → x + DropPath(MLP(LN x)); no final LN.
    """

    width: int
    mlp_dim: int
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, grid: jax.Array, *, train: bool) -> jax.Array:
        """float32[B, h, w, C] → float32[B, h * w, width]."""
        b, h, w, c = grid.shape
        x = nn.Dense(self.width, kernel_init=dense_init, dtype=self.dtype, name="proj")(
            grid.reshape(b, h * w, c)
        )
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="proj_ln")(x)
        x = x + posemb_sincos_2d(h, w, self.width).astype(x.dtype)
        y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_mlp")(x)
        y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(y, train=train)
        return x + drop_path(self.drop_path)(y, deterministic=not train)


class EncoderDecoder(nn.Module):
    """ViT encoder, MLP bridge and autoregressive decoder.

    Attributes:
      encoder_config: kwargs of `vit.Encoder` (patch_size, width, depth, mlp_dim,
        num_heads).
      decoder_config: kwargs of `decoder.Decoder` (width, depth, mlp_dim, num_heads,
        coord_range).
      vocab_size: V, the shared token space.
      max_len: longest decoder sequence (prompt + answer).
      dropout, drop_path: rates used everywhere.
      dtype: compute type (float32 or bfloat16); parameters and logits stay float32.
      remat: a `vit.REMAT_POLICIES` name for every encoder block and decoder layer.
    """

    encoder_config: dict
    decoder_config: dict
    vocab_size: int
    max_len: int
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    remat: str = "none"

    def setup(self):
        rates = dict(dropout=self.dropout, drop_path=self.drop_path, dtype=self.dtype)
        enc, dec = self.encoder_config, self.decoder_config
        self.encoder = Encoder(**enc, **rates, remat=self.remat)
        # The official bridge MLP keeps the encoder's mlp / width ratio.
        ratio = enc["mlp_dim"] // enc["width"]
        self.bridge = Bridge(dec["width"], ratio * dec["width"], **rates)
        self.decoder = Decoder(self.vocab_size, self.max_len, **dec, **rates, remat=self.remat)

    def encode(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """float32[B, H, W, 3] in [0, 1] → float32[B, N, d_dec] image tokens."""
        return self.bridge(self.encoder(images, train=train), train=train)

    def decode(self, tokens: jax.Array, encoded: jax.Array, *, train: bool = False) -> jax.Array:
        """Teacher-forced logits.

        Args:
          tokens: int32[B, T], or int32[B, C, T] for C sequences per image.
          encoded: float32[B, N, d_dec] from `encode`.

        Returns:
          float32[B, T, V] or float32[B, C, T, V]; position t predicts token t + 1.
        """
        return self.decoder.logits(self.decode_hidden(tokens, encoded, train=train))

    def decode_hidden(
        self, tokens: jax.Array, encoded: jax.Array, *, train: bool = False
    ) -> jax.Array:
        """float[B, (C,) T, d_dec]: what `decode` projects onto the vocabulary (`logits`)."""
        if tokens.ndim == 2:
            return self.decoder.hidden(tokens, encoded, train=train)
        b, c, t = tokens.shape
        # Row b * C + j of the flat batch is sequence j of image b.
        encoded = jnp.repeat(encoded, c, axis=0)
        hidden = self.decoder.hidden(tokens.reshape(b * c, t), encoded, train=train)
        return hidden.reshape(b, c, t, -1)

    def hidden(self, images: jax.Array, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """`__call__` up to the output projection: float[B, (C,) T, d_dec]."""
        return self.decode_hidden(tokens, self.encode(images, train=train), train=train)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float[..., d_dec] → float32[..., V]: the output projection (see `Decoder.logits`)."""
        return self.decoder.logits(hidden)

    def token_cross_entropy(
        self, hidden: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
    ) -> jax.Array:
        """float32[N]: the loss of each position of `hidden` float[N, d_dec] (`Decoder`)."""
        return self.decoder.token_cross_entropy(hidden, targets, label_smoothing)

    def __call__(
        self, images: jax.Array, tokens: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Logits for a batch: see `encode` and `decode`.

        Returns:
          (logits float32[B, (C,) T, V], {"encoded": float32[B, N, d_dec]}).
        """
        encoded = self.encode(images, train=train)
        return self.decode(tokens, encoded, train=train), {"encoded": encoded}

    def init_cache(self, encoded: jax.Array, length: int) -> Cache:
        """Decoding cache for `length` tokens; see `Decoder.init_cache`."""
        return self.decoder.init_cache(encoded, length)

    def step(
        self, tokens: jax.Array, cache: Cache, index: jax.Array | int
    ) -> tuple[jax.Array, Cache]:
        """Cached logits float32[B, t, V] for tokens int32[B, t]; see `Decoder.step`."""
        return self.decoder.step(tokens, cache, index)
