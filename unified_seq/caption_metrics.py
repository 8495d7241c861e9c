"""BLEU-4 and CIDEr(-D) of captions, with the coco-caption scorers.

pycocoevalcap's BLEU and CIDEr scorers are pure Python; its PTB tokenizer
needs Java, so captions are tokenized here the way it does: lower case,
punctuation dropped, split on white space.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

# The punctuation the coco-caption PTB tokenizer removes.
_PUNCTUATION = re.compile(r"[\"'`.,:;?!\-_()\[\]{}/\\*&@#$%^~+=<>|]")


def tokenize(text: str) -> str:
    """Lower-cased words of a caption, punctuation removed, single spaces."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(
    references: Mapping[int, Sequence[str]], predictions: Mapping[int, str]
) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr of one predicted caption per image.

    Args:
      references: image id → its ground-truth captions.
      predictions: image id → the predicted caption; every id must have references.

    Returns:
      {"BLEU-4": …, "CIDEr": …}; BLEU in [0, 1], CIDEr typically in [0, 10].
    """
    missing = [i for i in predictions if i not in references]
    if missing:
        raise ValueError(f"predictions for images without reference captions: {missing[:5]}")
    if not predictions:
        return {"BLEU-4": 0.0, "CIDEr": 0.0}
    gts = {i: [tokenize(c) for c in references[i]] for i in predictions}
    res = {i: [tokenize(predictions[i])] for i in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(cider)}
