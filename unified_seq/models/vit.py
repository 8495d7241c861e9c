"""Vision Transformer image encoder and the layers the decoder shares with it.

Follows the official Pix2Seq ViT (facts §5): a strided convolution cuts the
image into patches, a LayerNorm and a fixed 2-D sin-cos code follow, then
pre-LN Transformer blocks and a final LayerNorm. There is no class token.

Dense kernels use Xavier (Glorot) uniform init with zero biases, as the
official Keras layers do; LayerNorm epsilon is 1e-6 everywhere.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LN_EPS = 1e-6
dense_init = nn.initializers.xavier_uniform()


def posemb_sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position code, the official `get_2d_position_codes`.

    Row and column indices are spread over [0, 2π] (index / (n - 1) · 2π).
    Each axis gets dim / 2 channels: a block of sin(coord · f_k) followed by a
    block of cos(coord · f_k), f_k = 1 / 10000^(2k / (dim / 2)), k < dim / 4.
    The y code fills channels [0, dim / 2), the x code [dim / 2, dim).

    Returns:
      float32[height * width, dim], rows in raster order (y major).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position code needs a width divisible by 4, got {dim}")
    half = dim // 2
    freqs = 1.0 / 10000.0 ** (2.0 * np.arange(half // 2) / half)

    def axis_code(n: int) -> np.ndarray:
        coords = np.arange(n) / max(n - 1, 1) * 2.0 * np.pi
        angles = coords[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)  # [n, half]

    y_code = np.broadcast_to(axis_code(height)[:, None, :], (height, width, half))
    x_code = np.broadcast_to(axis_code(width)[None, :, :], (height, width, half))
    code = np.concatenate([y_code, x_code], axis=-1)
    return code.reshape(height * width, dim).astype(np.float32)


class Attention(nn.Module):
    """Multi-head attention with biased query/key/value/output projections.

    Projections are separate methods so the decoder can project image keys and
    values once per image and each new token's keys and values once per step.
    Shapes: B batch, T queries, S keys, H heads, D head width, W model width.
    """

    num_heads: int
    width: int
    dtype: Any = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
        heads = (self.num_heads, self.width // self.num_heads)
        proj = dict(features=heads, kernel_init=dense_init, dtype=self.dtype)
        self.query = nn.DenseGeneral(**proj)
        self.key = nn.DenseGeneral(**proj)
        self.value = nn.DenseGeneral(**proj)
        self.out = nn.DenseGeneral(
            self.width, axis=(-2, -1), kernel_init=dense_init, dtype=self.dtype
        )

    def project_query(self, x: jax.Array) -> jax.Array:
        """float32[B, T, W] → float32[B, T, H, D]."""
        return self.query(x)

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """float32[B, S, W] → keys and values, each float32[B, S, H, D]."""
        return self.key(x), self.value(x)

    def attend(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
    ) -> jax.Array:
        """Scaled dot-product attention and output projection.

        Args:
          q: float32[B, T, H, D] projected queries.
          k, v: float32[B, S, H, D] projected keys and values.
          mask: bool[T, S] or bool[B, T, S], True where a query may look.

        Returns:
          float32[B, T, W].
        """
        q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
        if mask is not None:
            mask = mask[None, None] if mask.ndim == 2 else mask[:, None]
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out(jnp.einsum("bhts,bshd->bthd", weights, v))

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None
    ) -> jax.Array:
        """Attention of x float32[B, T, W] over context (default x) float32[B, S, W]."""
        k, v = self.project_kv(x if context is None else context)
        return self.attend(self.project_query(x), k, v, mask)


class MlpBlock(nn.Module):
    """Dense → exact GELU → dropout → Dense, back to the input width."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """float32[..., W] → float32[..., W]."""
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, kernel_init=dense_init, dtype=self.dtype, name="hidden")(x)
        x = nn.gelu(x, approximate=False)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.Dense(width, kernel_init=dense_init, dtype=self.dtype, name="out")(x)


# Rematerialisation (`config.model.remat`), applied per encoder block and per
# decoder layer: what the backward pass keeps of a block's forward pass.
#   none: everything (fastest, most memory);
#   full: only the block's inputs, the whole block is recomputed;
#   dots: the outputs of matmuls without batch dimensions (the dense
#     projections); attention scores and elementwise ops are recomputed,
#     which drops the [B, H, N, N] attention maps that dominate at 1600+
#     image tokens.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module: type[nn.Module], policy: str, static_argnums: tuple[int, ...]) -> type:
    """`module`, or its `nn.remat` under the named policy; parameters are the same.

    `static_argnums` counts `self` as 0 and must cover the `train` flag, which
    Python control flow reads.
    """
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat {policy!r} is unknown; choose one of {list(REMAT_POLICIES)}")
    if policy == "none":
        return module
    return nn.remat(module, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


def drop_path(rate: float, name: str | None = None) -> nn.Dropout:
    """Stochastic depth for a float[B, T, W] residual branch.

    Dropout whose mask is shared over every axis but the batch: a whole branch
    is dropped per example and kept ones are rescaled by 1 / (1 - rate).
    """
    return nn.Dropout(rate, broadcast_dims=(1, 2), name=name)


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block: x + DropPath(MHA(LN x)); x + DropPath(MLP(LN x))."""

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """float32[B, N, W] → float32[B, N, W]; `train` positional for `remat`."""
        skip = drop_path(self.drop_path)
        h = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_attn")(x)
        h = Attention(self.num_heads, x.shape[-1], self.dtype, name="attn")(h)
        x = x + skip(h, deterministic=not train)
        h = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_mlp")(x)
        h = MlpBlock(self.mlp_dim, self.dropout, self.dtype, name="mlp")(h, train=train)
        return x + skip(h, deterministic=not train)


class ConvStem(nn.Module):
    """Stack of 3x3 stride-2 convolutions in place of the one-shot patch projection.

    log2(patch_size) convolutions, each halving the side and doubling the
    channels up to `width`, with LayerNorm and GELU between them, then a 1x1
    projection: the same token grid as the patch stem. Early convolutions make
    small ViTs learn where things are much sooner (Xiao et al. 2021, "Early
    convolutions help transformers see better"); the official Pix2Seq uses the
    patch stem, the default here too.
    """

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        """float32[B, H, W, 3] → float32[B, H / patch, W / patch, width]."""
        num_convs = int(np.log2(self.patch_size))
        if 2**num_convs != self.patch_size:
            raise ValueError(f"stem 'conv' needs a power-of-two patch_size, got {self.patch_size}")
        x = images
        for i in range(num_convs):
            features = max(self.width // 2 ** (num_convs - 1 - i), 16)
            x = nn.Conv(
                features,
                (3, 3),
                strides=(2, 2),
                padding="SAME",
                dtype=self.dtype,
                kernel_init=dense_init,
                name=f"conv_{i}",
            )(x)
            x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name=f"ln_{i}")(x)
            x = nn.gelu(x, approximate=False)
        return nn.Conv(self.width, (1, 1), dtype=self.dtype, kernel_init=dense_init, name="proj")(x)


STEMS = ("patch", "conv")


class Encoder(nn.Module):
    """ViT over square patches, returning the token grid.

    Attributes:
      patch_size: side of a patch in pixels (kernel = stride of the stem).
      stem: "patch" (one strided convolution, official) or "conv" (ConvStem).
      width, depth, mlp_dim, num_heads: Transformer sizes.
      dropout: rate on the MLP hidden units.
      drop_path: stochastic-depth rate on every residual branch.
      dtype: compute type; parameters stay float32.
      remat: a `REMAT_POLICIES` name, applied to every block.
    """

    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    drop_path: float = 0.0
    stem: str = "patch"
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Encodes images.

        Args:
          images: float32[B, H, W, 3], pixels in [0, 1].
          train: enables dropout and drop-path (needs a 'dropout' rng).

        Returns:
          float32[B, H / patch, W / patch, width] (sizes rounded down).
        """
        p = self.patch_size
        if self.stem == "conv":
            x = ConvStem(p, self.width, self.dtype, name="conv_stem")(images)
        elif self.stem == "patch":
            x = nn.Conv(
                self.width,
                (p, p),
                strides=(p, p),
                padding="VALID",
                kernel_init=dense_init,
                dtype=self.dtype,
                name="stem",
            )(images)
        else:
            raise ValueError(f"model.stem={self.stem!r}; choose one of {STEMS}")
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, self.width)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="stem_ln")(x)
        x = x + posemb_sincos_2d(h, w, self.width).astype(x.dtype)
        block = remat(EncoderBlock, self.remat, static_argnums=(2,))
        for i in range(self.depth):
            x = block(
                self.mlp_dim,
                self.num_heads,
                self.dropout,
                self.drop_path,
                self.dtype,
                name=f"block_{i}",
            )(x, train)
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="ln_out")(x)
        return x.reshape(b, h, w, self.width)
