"""Official Pix2Seq TF2 checkpoint keys ↔ unified_seq parameter paths.

An official checkpoint (`tf.train.Checkpoint(model=…, global_step=…,
optimizer=…)`) stores each variable under its object-graph path, e.g.

    model/encoder/transformer_encoder/enc_layers/3/mha/_query_dense/kernel/.ATTRIBUTES/VARIABLE_VALUE

The model's layers line up one to one with ours (models/vit.py, decoder.py,
encoder_decoder.py) and every array already has our layout: Keras and flax
both store dense kernels [in, out], attention kernels [W, H, D] and
[H, D, W], convolution kernels HWIO. So a key maps by renaming alone, no
transpose: LayerNorm gamma/beta become scale/bias, `mha/_query_dense`
becomes `attn/query`, and so on.

Weights made with `add_weight` under a name holding `/` appear with the
slash escaped as `.S` (`ar_decoder.Stoken_embedding`).
"""

from __future__ import annotations

import re

SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
MODEL_PREFIX = "model/"

_LEAF = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias"}

# Sub-layers shared by encoder blocks, decoder layers and the bridge,
# official → ours, relative to their block.
_SUBLAYERS = (
    (r"(?:mha|self_mha)/_(?P<p>query|key|value)_dense", r"{attn}/\g<p>"),
    (r"(?:mha|self_mha)/_output_dense", r"{attn}/out"),
    (r"cross_mha/_(?P<p>query|key|value)_dense", r"cross_attn/\g<p>"),
    (r"cross_mha/_output_dense", r"cross_attn/out"),
    (r"mha_ln", r"ln_attn"),
    (r"self_ln", r"ln_self"),
    (r"cross_ln", r"ln_cross"),
    (r"mlp/layernorms/0", r"ln_mlp"),
    (r"mlp/mlp_layers/0/dense1", r"mlp/hidden"),
    (r"mlp/mlp_layers/0/dense2", r"mlp/out"),
)

# (official module path, ours), whole-match regexes; a leaf name follows.
_MODULES: list[tuple[str, str]] = [
    (r"encoder/stem_conv", "encoder/stem"),
    (r"encoder/stem_ln", "encoder/stem_ln"),
    (r"encoder/output_ln", "encoder/ln_out"),
    (r"proj", "bridge/proj"),
    (r"proj_ln", "bridge/proj_ln"),
    (r"proj_mlp/layernorms/0", "bridge/ln_mlp"),
    (r"proj_mlp/mlp_layers/0/dense1", "bridge/mlp/hidden"),
    (r"proj_mlp/mlp_layers/0/dense2", "bridge/mlp/out"),
    (r"decoder/output_ln", "decoder/ln_out"),
]
for _official, _ours in _SUBLAYERS:
    _MODULES.append(
        (
            r"encoder/transformer_encoder/enc_layers/(?P<i>\d+)/" + _official,
            r"encoder/block_\g<i>/" + _ours.format(attn="attn"),
        )
    )
    _MODULES.append(
        (
            r"decoder/decoder/dec_layers/(?P<i>\d+)/" + _official,
            r"decoder/layers_\g<i>/" + _ours.format(attn="self_attn"),
        )
    )

# Variables created by `add_weight` (no leaf name).
_WHOLE = {
    "decoder/ar_decoder.Stoken_embedding": "decoder/embed/embedding",
    "decoder/ar_decoder.Sseq_pos_embedding": "decoder/pos_embed",
    "decoder/ar_decoder.Soutp_bias": "decoder/output_bias",
}

# Official variables with no counterpart here, and why (shown when one is met).
_UNSUPPORTED = (
    (
        r"outp_embedding",
        "separate output embedding (shared_decoder_embedding=False); "
        "unified_seq ties the output layer to the token embedding",
    ),
    (r"cls_token", "a class token (use_cls_token=True); unified_seq's ViT has none"),
    (
        r"encoder/.*pos_emb",
        "a learned encoder position table (pos_encoding='learned'); "
        "unified_seq adds the fixed 2-D sin-cos code",
    ),
    (
        r"resnet|block_groups|stem/",
        "a ResNet backbone; unified_seq's encoder is the plain ViT (resnet_variant 'c1')",
    ),
)


def strip(key: str) -> str:
    """`model/x/y/.ATTRIBUTES/VARIABLE_VALUE` → `x/y`."""
    if key.endswith(SUFFIX):
        key = key[: -len(SUFFIX)]
    return key[len(MODEL_PREFIX) :] if key.startswith(MODEL_PREFIX) else key


def is_model_key(key: str) -> bool:
    """True for the model's variables; global_step, save_counter, optimizer/… are not."""
    return key.startswith(MODEL_PREFIX) and key.endswith(SUFFIX)


def to_ours(key: str) -> str | None:
    """Our parameter path ("encoder/block_3/attn/query/kernel") for an official key, or None."""
    name = strip(key)
    if name in _WHOLE:
        return _WHOLE[name]
    module, _, leaf = name.rpartition("/")
    if leaf not in _LEAF:
        return None
    for pattern, replacement in _MODULES:
        match = re.fullmatch(pattern, module)
        if match:
            return f"{match.expand(replacement)}/{_LEAF[leaf]}"
    return None


def why_unsupported(key: str) -> str:
    """A reason an official key has no counterpart, for the error message."""
    name = strip(key)
    for pattern, reason in _UNSUPPORTED:
        if re.search(pattern, name):
            return reason
    return "no counterpart in unified_seq's model"
