"""Captioning as tokens: `[13] piece piece … EOS` (DESIGN §3).

Each caption piece id `p` is written as `text_shift + p`; the answer ends with
the shared EOS (0). An image trains `captions_per_image` captions at once (5 in
the official recipe), one sequence each over the same encoded image.

During training half of the answer's *input* tokens are replaced by the fake
text token 30 (official `input_seq_drop_rate` 0.5), so the decoder cannot just
copy the previous word; the targets keep the true pieces. Unlike the official
code the prompt is never dropped, and the padding after EOS is never trained.

Answers are sampled under a grammar (`answer_grammar`): at least one text
piece the tokenizer can write (no control or unknown piece), then EOS.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from ml_collections import ConfigDict

from unified_seq import caption_metrics, visualize, vocab
from unified_seq.data import transforms, views
from unified_seq.grammar import Grammar
from unified_seq.tasks.sequence import build_sequences
from unified_seq.tasks.task import Labels, Task, Truth, one_example
from unified_seq.tasks.tokenizer import CaptionTokenizer

PROMPT_TOKEN = vocab.TASK_PROMPTS["captioning"]


def sequence_length(cfg: ConfigDict) -> int:
    """Input/target length: the prompt, up to `max_len - 1` pieces and EOS."""
    return int(cfg.max_len)


def _choose_captions(num_captions: tf.Tensor, count: int, seed: tf.Tensor, training: bool):
    """Indices int32[count] of the captions to train, in [0, num_captions].

    Training takes a random order and cycles through it, so captions repeat
    only when the image has fewer than `count`; evaluation takes the first.
    Without captions every index is `num_captions`, the empty row after them.
    """
    order = tf.range(num_captions)
    if training:
        order = tf.random.experimental.stateless_shuffle(order, seed)
    order = tf.concat([order, [num_captions]], axis=0)
    return tf.gather(order, tf.range(count) % tf.maximum(num_captions, 1))


def _drop_answer_inputs(
    input_seq: tf.Tensor, answer_len: tf.Tensor, rate: float, seed: tf.Tensor
) -> tf.Tensor:
    """Replaces each answer input token (never the prompt) by FAKE_TEXT with probability `rate`.

    input_seq: int32[L]; answer tokens sit at positions 1 .. answer_len.
    """
    position = tf.range(tf.shape(input_seq)[0])
    in_answer = (position >= 1) & (position <= answer_len)
    hit = tf.random.stateless_uniform(tf.shape(input_seq), seed) < rate
    return tf.where(in_answer & hit, vocab.FAKE_TEXT, input_seq)


def encode(
    caption_ids: tf.RaggedTensor,
    seed: tf.Tensor,
    cfg: ConfigDict,
    space: vocab.TokenSpace,
    training: bool = True,
) -> dict[str, tf.Tensor]:
    """Tokenizes an image's captions into `captions_per_image` sequences.

    Args:
      caption_ids: int32 ragged [C, None] SentencePiece ids of the image's C
        captions (C may be 0).
      seed: int32[2] or int64[2] stateless seed (caption choice, input drop).
      cfg: the `captioning` task config (max_len, eos_weight,
        captions_per_image, input_drop_rate).
      space: token space.
      training: random caption choice and input drop; otherwise the first
        captions, untouched.

    Returns:
      `input_seq`, `target_seq` int32[K, L] and `token_weights` float32[K, L],
      K = cfg.captions_per_image, L = sequence_length(cfg). Captions repeat
      when C < K; with C = 0 every row has weight 0.
    """
    count = int(cfg.captions_per_image)
    length = sequence_length(cfg)
    # stateless_split draws seeds of the seed's dtype: one dtype makes int32
    # and int64 seeds of equal value give equal sequences.
    seed = tf.cast(seed, tf.int64)
    choice_seed, drop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    drop_seeds = tf.random.experimental.stateless_split(drop_seed, count)

    caption_ids = tf.cast(caption_ids, tf.int32)
    num_captions = tf.cast(caption_ids.nrows(), tf.int32)
    # One empty row keeps the gathers valid for an image without captions.
    empty = tf.ragged.constant([[]], tf.int32, row_splits_dtype=caption_ids.row_splits.dtype)
    padded = tf.concat([caption_ids, empty], axis=0)
    chosen = _choose_captions(num_captions, count, choice_seed, training)
    has_caption = tf.cast(num_captions > 0, tf.float32)

    rows = []
    for k in range(count):
        answer = padded[chosen[k]] + space.text_shift
        weights = tf.ones_like(answer, tf.float32)
        seq = build_sequences(
            tf.constant([PROMPT_TOKEN]), answer, weights, length, float(cfg.eos_weight)
        )
        seq["token_weights"] *= has_caption
        if training and cfg.input_drop_rate > 0:
            answer_len = tf.minimum(tf.shape(answer)[0], length - 1)
            seq["input_seq"] = _drop_answer_inputs(
                seq["input_seq"], answer_len, float(cfg.input_drop_rate), drop_seeds[k]
            )
        rows.append(seq)
    return {key: tf.stack([row[key] for row in rows]) for key in rows[0]}


def decode(tokens: np.ndarray, tokenizer: CaptionTokenizer, space: vocab.TokenSpace) -> str:
    """Caption text from answer tokens int[T] (after the prompt).

    Reads up to the first EOS and keeps only text tokens.
    """
    tokens = np.asarray(tokens).reshape(-1)
    ends = np.flatnonzero(tokens == vocab.EOS)
    if ends.size:
        tokens = tokens[: ends[0]]
    text = tokens[space.is_text(tokens)] - space.text_shift
    return tokenizer.decode(text.tolist())


def answer_grammar(space: vocab.TokenSpace, tokenizer: CaptionTokenizer | None) -> Grammar:
    """One or more text pieces, then EOS.

    With a tokenizer only its text pieces are allowed (the text range is
    usually wider than the tokenizer); without one, the whole text range.
    """
    tokens = np.arange(space.vocab_size)
    if tokenizer is None:
        text = space.is_text(tokens)
    else:
        text = np.zeros([space.vocab_size], bool)
        text[space.text_shift + tokenizer.text_piece_ids()] = True
    return Grammar.build(
        kinds={"text": text, "eos": tokens == vocab.EOS},
        transitions={
            "first": {"text": "more"},
            "more": {"text": "more", "eos": "end"},
            "end": {"eos": "end"},
        },
        start="first",
    )


def to_coco_results(text: str, image_id: int) -> dict:
    """One COCO caption result."""
    return {"image_id": int(image_id), "caption": text}


class Captioning(Task):
    """Captioning: prompt `[13]`, answer the caption's pieces (module docstring)."""

    prompt_token = PROMPT_TOKEN
    annotations = ("captions",)

    @property
    def sequence_length(self) -> int:
        return sequence_length(self.cfg)

    @property
    def sequence_shape(self) -> tuple[int, ...]:
        return (int(self.cfg.captions_per_image), self.sequence_length)

    def has_training_target(self, example: dict) -> tf.Tensor:
        return tf.size(example["captions/ids"].flat_values) > 0

    def train_examples(
        self, example: dict, image: tf.Tensor, seed: tf.Tensor, labels: Labels
    ) -> dict[str, tf.Tensor]:
        del labels
        cfg, size = self.cfg, self.run.image_size
        seeds = tf.random.experimental.stateless_split(seed, 6)
        f = views.augment({"image": image}, seeds[:3], cfg, size)
        if cfg.color_jitter > 0:
            f["image"] = transforms.color_jitter(f["image"], seeds[4], cfg.color_jitter)
        f = transforms.pad_to_square(f, size, self.run.pad_value)
        seq = encode(example["captions/ids"], seeds[3], cfg, self.space, training=True)
        return one_example({"image": f["image"], **seq})

    def eval_examples(self, example: dict, image: tf.Tensor, labels: Labels) -> dict:
        del labels
        view = views.eval_image(example, image, self.run.image_size, self.run.pad_value)
        return one_example({**view, "prompt": tf.constant([PROMPT_TOKEN], tf.int32)})

    def answer_grammar(self, labels: Labels | None) -> Grammar:
        return answer_grammar(self.space, labels.tokenizer if labels is not None else None)

    def results(self, batch: dict, samples: dict, labels: Labels) -> list[dict]:
        return [
            to_coco_results(decode(tokens, labels.tokenizer, self.space), int(image_id))
            for tokens, image_id in zip(samples["tokens"], batch["image/id"], strict=True)
        ]

    def metric(self, results: list[dict], truth: Truth) -> dict[str, float]:
        references: dict[int, list[str]] = {}
        for ann in truth.coco("captions").dataset["annotations"]:
            references.setdefault(int(ann["image_id"]), []).append(ann["caption"])
        # Images without reference captions cannot be scored.
        predictions = {r["image_id"]: r["caption"] for r in results if r["image_id"] in references}
        return caption_metrics.caption_scores(references, predictions)

    def preview(self, example: dict, labels: Labels):
        text = decode(example["target_seq"][0], labels.tokenizer, self.space)
        return visualize.draw(example["image"], caption=text)
