"""The Pix2Seq v2 model: ViT encoder, MLP bridge, cached Transformer decoder."""

from unified_seq.models.encoder_decoder import EncoderDecoder
from unified_seq.models.sizes import SIZES, build_model, model_config

__all__ = ["SIZES", "EncoderDecoder", "build_model", "model_config"]
