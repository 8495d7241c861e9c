"""SentencePiece tokenizer for captions (DESIGN §2, text range of the token space).

A piece id `p` becomes the token `text_shift + p`. The tokenizer adds no BOS
and no EOS: the caption codec ends every answer with the shared EOS token 0.
The official `c4_en_32k_spm.model` loads as is; `train` builds a model from a
data set's own captions, laid out like the T5/C4 model (0 pad, 1 eos, 2 unk,
no bos) so either kind reads the same way.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import sentencepiece as spm
import tensorflow as tf

# Special pieces of a trained model (T5 layout); they count toward vocab_size.
_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "unk_id": 2, "bos_id": -1}
_NUM_SPECIALS = 3
_NUM_BYTE_PIECES = 256


def _read_bytes(path: str) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


def _write_bytes(path: str, data: bytes) -> None:
    """Writes through a temporary name and renames, so no reader sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    folder = os.path.dirname(path)
    if folder:
        tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _vocab_path(model_path: str) -> str:
    root, ext = os.path.splitext(model_path)
    return (root if ext == ".model" else model_path) + ".vocab"


class CaptionTokenizer:
    """A SentencePiece model: caption text ↔ piece ids in [0, vocab_size)."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str = ""):
        self._sp = processor
        self.path = path

    @classmethod
    def load(cls, model_path: str) -> CaptionTokenizer:
        """Reads a SentencePiece model file (any tf.io.gfile path: local, gs://, ram://)."""
        processor = spm.SentencePieceProcessor(model_proto=_read_bytes(model_path))
        return cls(processor, model_path)

    @classmethod
    def train(
        cls,
        captions: Sequence[str],
        model_path: str,
        vocab_size: int,
        model_type: str = "bpe",
    ) -> CaptionTokenizer:
        """Trains a model on `captions`, writes `model_path` (and a `.vocab` listing).

        `vocab_size` is an upper bound: a small corpus yields fewer pieces.
        Every character of the captions gets a piece, and when the budget
        allows, 256 byte pieces too, so that unseen characters still round
        trip. Training is single-threaded, hence deterministic.

        Args:
          captions: training sentences.
          model_path: where to write the model (any tf.io.gfile path).
          vocab_size: most pieces, special pieces included.
          model_type: "bpe" or "unigram" (as the C4 model). BPE is the
            default: on a small corpus such as the synthetic set, unigram
            training with a vocab_size above what the corpus supports keeps
            mostly single characters (captions ~2x longer), BPE whole words.

        Raises:
          ValueError: no captions, or `vocab_size` below the number of
            distinct characters plus the special pieces.
        """
        captions = [c for c in captions if c.strip()]
        if not captions:
            raise ValueError(f"no captions to train the tokenizer {model_path} on")
        num_chars = len(set("".join(captions)))
        needed = num_chars + _NUM_SPECIALS
        if vocab_size < needed:
            raise ValueError(
                f"tokenizer vocab_size={vocab_size} is below the {needed} pieces the captions "
                f"need ({num_chars} distinct characters + {_NUM_SPECIALS} special pieces); "
                "raise vocab.text_vocab_size"
            )
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            # Identity keeps decode(encode(text)) == text for seen characters.
            normalization_rule_name="identity",
            character_coverage=1.0,
            byte_fallback=vocab_size >= needed + _NUM_BYTE_PIECES,
            # A soft limit, so that small corpora (the synthetic set) still train.
            hard_vocab_limit=False,
            num_threads=1,
            minloglevel=2,
            **_SPECIAL_IDS,
        )
        tokenizer = cls(spm.SentencePieceProcessor(model_proto=writer.getvalue()), model_path)
        tokenizer.save(model_path)
        return tokenizer

    def save(self, model_path: str) -> None:
        """Writes the model to `model_path` (any tf.io.gfile path) with its `.vocab` listing."""
        _write_bytes(model_path, self._sp.serialized_model_proto())
        _write_bytes(_vocab_path(model_path), self._vocab_listing().encode("utf-8"))

    @classmethod
    def load_or_train(
        cls,
        model_path: str,
        captions_fn: Callable[[], Sequence[str]],
        vocab_size: int,
    ) -> CaptionTokenizer:
        """Loads `model_path` if it exists, else trains it on `captions_fn()`.

        Raises:
          ValueError: an existing model has more than `vocab_size` pieces.
        """
        if not tf.io.gfile.exists(model_path):
            return cls.train(captions_fn(), model_path, vocab_size)
        tokenizer = cls.load(model_path)
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(
                f"tokenizer {model_path} has {tokenizer.vocab_size} pieces but the text range "
                f"holds {vocab_size}; delete the file to retrain it, or raise "
                "vocab.text_vocab_size"
            )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special pieces included."""
        return self._sp.get_piece_size()

    def text_piece_ids(self) -> np.ndarray:
        """int[N]: the pieces that write text (not control pieces, not the unknown piece)."""
        sp = self._sp
        ids = range(self.vocab_size)
        return np.array([i for i in ids if not (sp.is_control(i) or sp.is_unknown(i))], np.int64)

    def encode(self, text: str) -> list[int]:
        """Text → piece ids, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in one call (COCO train's 592k captions: seconds, not tens)."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """Piece ids → text; ids outside [0, vocab_size) are skipped, control pieces dropped."""
        size = self.vocab_size
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < size])

    def _vocab_listing(self) -> str:
        """`piece<TAB>score` lines, as SentencePiece's own .vocab files."""
        return "".join(
            f"{self._sp.id_to_piece(i)}\t{self._sp.get_score(i)}\n" for i in range(self.vocab_size)
        )
