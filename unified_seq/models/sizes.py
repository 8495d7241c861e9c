"""Named model sizes and the model config block.

    config.model = model_config("tiny")                 # in a configs/*.py
    --config.model.variant=vit-b                        # on the command line
    --config.model.dec_depth=4                          # one size, any variant
    --config.model.stem=conv                            # conv stem (vit.ConvStem)
    --config.model.coord_embed_init=sincos              # ordered coordinate rows
    --config.model.dtype=bfloat16 --config.model.remat=dots   # memory and speed
    model = build_model(config.model, vocab_size, max_len, coord_range)

Every size field of the config block defaults to None, meaning "the
variant's value", so switching the variant on the command line switches all
sizes, and a field set explicitly wins over the variant.

vit-b and vit-l are the official Pix2Seq v2 sizes (DESIGN §5). tiny and small
are ours, sized to train in minutes on a 2-core CPU on 128-pixel images
(8 × 8 image tokens with 16-pixel patches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from unified_seq.models.decoder import EMBED_INITS
from unified_seq.models.encoder_decoder import EncoderDecoder
from unified_seq.models.vit import REMAT_POLICIES

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        patch_size=16,
        enc_depth=2,
        enc_width=128,
        enc_mlp_dim=512,
        enc_heads=4,
        dec_depth=2,
        dec_width=128,
        dec_mlp_dim=512,
        dec_heads=4,
        dropout=0.1,
        drop_path=0.0,  # stochastic depth does not pay at depth 2
    ),
    "small": dict(
        patch_size=16,
        enc_depth=4,
        enc_width=192,
        enc_mlp_dim=768,
        enc_heads=3,
        dec_depth=3,
        dec_width=192,
        dec_mlp_dim=768,
        dec_heads=3,
        dropout=0.1,
        drop_path=0.0,
    ),
    "vit-b": dict(
        patch_size=16,
        enc_depth=12,
        enc_width=768,
        enc_mlp_dim=3072,
        enc_heads=12,
        dec_depth=6,
        dec_width=512,
        dec_mlp_dim=2048,
        dec_heads=16,
        dropout=0.1,
        drop_path=0.1,
    ),
    "vit-l": dict(
        patch_size=16,
        enc_depth=24,
        enc_width=1024,
        enc_mlp_dim=4096,
        enc_heads=16,
        dec_depth=8,
        dec_width=512,
        dec_mlp_dim=2048,
        dec_heads=16,
        dropout=0.1,
        drop_path=0.1,
    ),
}
_INT_FIELDS = tuple(k for k in SIZES["tiny"] if k not in ("dropout", "drop_path"))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> str:
    """`model.dtype` as a `DTYPES` key: "auto" is bfloat16 on accelerators, float32 on CPU.

    CPUs have no fast bfloat16 matmul, and on CPU (tests, the default
    recipe) float32 keeps results as they were measured.
    """
    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise ValueError(
            f"model.dtype {name!r} is unknown; choose one of {[*sorted(DTYPES), 'auto']}"
        )
    return name


def _check_variant(variant: str) -> dict[str, Any]:
    if variant not in SIZES:
        raise ValueError(f"model.variant {variant!r} is unknown; choose one of {sorted(SIZES)}")
    return SIZES[variant]


def model_config(variant: str = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
    """The `config.model` block: a variant name plus optional per-field overrides.

    Args:
      variant: one of `SIZES` (tiny, small, vit-b, vit-l).
      **overrides: size fields (e.g. dec_depth=4), dropout, drop_path, or
        dtype ("float32" | "bfloat16" | "auto": bfloat16 unless JAX runs on CPU;
        the compute type, parameters, optimizer state, logits and loss stay float32),
        remat ("none" | "full" | "dots", vit.REMAT_POLICIES: what the backward
        pass of each encoder block and decoder layer keeps rather than recomputes),
        stem ("patch", the official patch projection, | "conv", vit.ConvStem),
        coord_embed_init ("normal", official, | "sincos": the coordinate rows of
        the token embedding start from an ordered code, decoder.token_embed_init).
    """
    _check_variant(variant)
    block = {
        "variant": variant,
        "dtype": "float32",
        "remat": "none",
        "stem": "patch",
        "coord_embed_init": "normal",
    }
    block.update({k: config_dict.placeholder(int) for k in _INT_FIELDS})
    block.update({k: config_dict.placeholder(float) for k in ("dropout", "drop_path")})
    config = ml_collections.ConfigDict(block)
    for key, value in overrides.items():
        if key not in block:
            raise ValueError(f"model_config: unknown field {key!r}; fields are {sorted(block)}")
        config[key] = value
    return config


def resolve(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Concrete sizes: the variant's table entry with the config's set fields on top."""
    model_cfg = dict(model_cfg)
    sizes = dict(_check_variant(model_cfg.pop("variant")))
    dtype = compute_dtype(model_cfg.pop("dtype", "float32"))
    remat = model_cfg.pop("remat", "none")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat {remat!r} is unknown; choose one of {list(REMAT_POLICIES)}")
    stem = model_cfg.pop("stem", "patch")
    coord_init = model_cfg.pop("coord_embed_init", "normal")
    if coord_init not in EMBED_INITS:
        raise ValueError(
            f"model.coord_embed_init {coord_init!r} is unknown; choose one of {EMBED_INITS}"
        )
    for key, value in model_cfg.items():
        if key not in sizes:
            raise ValueError(f"config.model.{key} is unknown; fields are {sorted(sizes)}")
        if value is not None:
            sizes[key] = value
    sizes["dtype"] = dtype
    sizes["remat"] = remat
    sizes["stem"] = stem
    sizes["coord_embed_init"] = coord_init
    return sizes


def build_model(
    model_cfg: Mapping[str, Any],
    vocab_size: int,
    max_len: int,
    coord_range: tuple[int, int] | None = None,
) -> EncoderDecoder:
    """The EncoderDecoder for `config.model`.

    Args:
      model_cfg: a `model_config` block (or any mapping with `variant`).
      vocab_size: V, size of the shared token space.
      max_len: longest decoder input (prompt + answer) in tokens.
      coord_range: (coord_shift, bins) of the token space; needed when
        model.coord_embed_init is "sincos", ignored otherwise.
    """
    s = resolve(model_cfg)
    if s["coord_embed_init"] == "normal":
        coord_range = None
    elif coord_range is None:
        raise ValueError("model.coord_embed_init='sincos' needs the coordinate range")
    return EncoderDecoder(
        encoder_config=dict(
            patch_size=s["patch_size"],
            width=s["enc_width"],
            depth=s["enc_depth"],
            mlp_dim=s["enc_mlp_dim"],
            num_heads=s["enc_heads"],
            stem=s["stem"],
        ),
        decoder_config=dict(
            width=s["dec_width"],
            depth=s["dec_depth"],
            mlp_dim=s["dec_mlp_dim"],
            num_heads=s["dec_heads"],
            coord_range=None if coord_range is None else tuple(map(int, coord_range)),
        ),
        vocab_size=vocab_size,
        max_len=max_len,
        dropout=float(s["dropout"]),
        drop_path=float(s["drop_path"]),
        dtype=DTYPES[s["dtype"]],
        remat=s["remat"],
    )
