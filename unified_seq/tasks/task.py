"""The task interface: everything one vision task means, in one object.

A task is built from its config block (`config.tasks.<name>`) and the
settings every task shares (`RunSpec`: token space, model input). It owns
its whole language:

    sequence_length, prompt_length   the decoder sequences it trains on
    has_training_target              which images it can train on
    train_examples                   augment, crop, tokenize, weight (tf.data map)
    eval_examples                    views and prompts to sample answers for
    sampler_options                  samples per prompt, logits, answer grammar
    answer_grammar                   which tokens may follow (constrained decoding)
    results                          sampled tokens → COCO-format results in
                                     original pixels and dataset category ids
    metric                           results → scores (pycocotools, BLEU, ...)
    preview                          a picture of one training example

`data/pipeline.py`, `evaluate.py`, `data_check.py` and `train.py` loop over
the configured tasks and call these; none of them knows a task by name.
Adding a task is one file with a `Task` subclass and one entry in
`unified_seq.tasks.TASKS`.

Examples flow through tf.data as dicts of tensors (data/example.py holds the
source layout). `train_examples` and `eval_examples` return a dict whose
entries share a leading axis: the examples this image yields (one for
detection and captioning, one per chosen instance for per-instance tasks
that crop); the pipeline unbatches them.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Protocol

import numpy as np
import tensorflow as tf
from ml_collections import ConfigDict
from PIL import Image

from unified_seq import vocab
from unified_seq.grammar import Grammar

# What a data source can hold; a task names the kinds it trains on.
ANNOTATIONS = ("boxes", "polygons", "keypoints", "captions")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """The settings every task of a run shares.

    Attributes:
      space: the token space.
      image_size: side of the square model input (the canvas), pixels.
      pad_value: grey level of the canvas padding.
      num_keypoints: keypoints per person in the data set.
    """

    space: vocab.TokenSpace
    image_size: int
    pad_value: float
    num_keypoints: int

    @classmethod
    def from_config(cls, config: Any) -> RunSpec:
        return cls(
            space=vocab.TokenSpace.from_config(config.vocab),
            image_size=int(config.data.image_size),
            pad_value=float(config.data.pad_value),
            num_keypoints=int(config.data.num_keypoints),
        )


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """How `decoding.sample_sequences` answers a task's prompts.

    Attributes:
      max_len: answer tokens to generate at most (EOS included).
      num_samples: answers drawn per prompt; rows b·S … b·S + S - 1 of the
        samples belong to example b.
      temperature, top_k, top_p: sampling settings.
      logits_range: (lo, hi) to also return the softmax over the vocabulary
        sliced to tokens [lo, hi) at every step (`range_probs`).
      return_logits: also return the raw logits of every step (`logits`).
      grammar: the answers' grammar (grammar.py): only tokens it allows are
        sampled; None allows every token.
    """

    max_len: int
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    logits_range: tuple[int, int] | None = None
    return_logits: bool = False
    grammar: Grammar | None = dataclasses.field(default=None, compare=False)


class Labels(Protocol):
    """What tasks need to know of a data set (`inputs.SplitData` has both)."""

    category_map: Any  # data.categories.CategoryMap
    tokenizer: Any  # tasks.tokenizer.CaptionTokenizer, or None without captions


class Truth(Protocol):
    """The evaluation split's ground truth (`coco_metrics.GroundTruth`)."""

    image_ids: list[int]

    def coco(self, kind: str) -> Any: ...


class Task(abc.ABC):
    """Base class of every task; subclasses fill in the methods below.

    Class attributes:
      prompt_token: the task's token in the prompt range 10-29.
      annotations: the kinds (of `ANNOTATIONS`) a data source must hold.
      gives_boxes: its results are COCO `bbox` results that can prompt
        other tasks (detection).
      takes_boxes: its evaluation examples are prompted by boxes: the
        ground truth's, or with `eval.prompt_boxes=detections` those of a
        task that gives boxes.
    """

    prompt_token: ClassVar[int]
    annotations: ClassVar[tuple[str, ...]] = ()
    gives_boxes: ClassVar[bool] = False
    takes_boxes: ClassVar[bool] = False

    def __init__(self, name: str, cfg: ConfigDict, run: RunSpec):
        self.name = name
        self.cfg = cfg
        self.run = run
        self.space = run.space

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # --- Sequences.
    @property
    def prompt_length(self) -> int:
        """Tokens of the prompt the decoder is given at inference."""
        return 1

    @property
    @abc.abstractmethod
    def sequence_length(self) -> int:
        """Decoder input (and target) length L of one sequence."""

    @property
    def sequence_shape(self) -> tuple[int, ...]:
        """Shape of one training example's `input_seq`: (L,), or (R, L) for R
        sequences over one image encoding."""
        return (self.sequence_length,)

    # --- Training.
    @abc.abstractmethod
    def has_training_target(self, example: dict[str, tf.Tensor]) -> tf.Tensor:
        """bool[]: whether the image can train this task (tf.data filter)."""

    @abc.abstractmethod
    def train_examples(
        self, example: dict[str, tf.Tensor], image: tf.Tensor, seed: tf.Tensor, labels: Labels
    ) -> dict[str, tf.Tensor]:
        """Training examples from one image visit (inside a tf.data map).

        Args:
          example: the source example (data/example.py keys, as tensors).
          image: float32[h, w, 3] in [0, 1], the decoded image.
          seed: int64[2] stateless seed of this visit.
          labels: the data set's category map and tokenizer.

        Returns:
          `image` float32[n, S, S, 3], `input_seq` and `target_seq` int32[n,
          *sequence_shape], `token_weights` float32[n, *sequence_shape], and
          optionally `num_truncated*` int32[n] counts of what did not fit.
        """

    # --- Evaluation.
    @abc.abstractmethod
    def eval_examples(
        self, example: dict[str, tf.Tensor], image: tf.Tensor, labels: Labels
    ) -> dict[str, tf.Tensor]:
        """Examples to sample answers for, from one image (inside a tf.data map).

        Returns:
          entries with a leading axis n: at least `image` float32[n, S, S, 3],
          `prompt` int32[n, prompt_length], `frame` float32[n, 4] (canvas →
          original pixels, frame.py), `image/id` int64[n] and `image/size`
          int32[n, 2]; anything else `results` needs.
        """

    def sampler_options(self, labels: Labels | None = None) -> SamplerOptions:
        """How to sample answers: this task's top-p etc., its answer length and,
        with `constrained` (default on), its answer grammar.

        `labels`: the data set's category map and tokenizer, which some
        grammars need (captions: the tokenizer's pieces); None: without them.
        """
        cfg = self.cfg
        return SamplerOptions(
            max_len=self.sequence_length - self.prompt_length + 1,
            temperature=float(cfg.get("temperature", 1.0)),
            top_k=int(cfg.get("top_k", 0)),
            top_p=float(cfg.get("top_p", 1.0)),
            grammar=self.answer_grammar(labels) if cfg.get("constrained", True) else None,
        )

    def answer_grammar(self, labels: Labels | None) -> Grammar | None:
        """The answers this task can read back, as a grammar over the token space;
        None (this default) samples any token."""
        del labels
        return None

    @abc.abstractmethod
    def results(
        self, batch: dict[str, np.ndarray], samples: dict[str, np.ndarray], labels: Labels
    ) -> list[dict]:
        """Results of n evaluation examples, JSON-ready (COCO result format).

        Args:
          batch: n examples of `eval_examples`, as numpy.
          samples: `decoding.sample_sequences` outputs for them: `tokens`
            int32[n·S, T] answers and whatever `sampler_options` asked for.
          labels: the data set's category map and tokenizer.
        """

    @abc.abstractmethod
    def metric(self, results: list[dict], truth: Truth) -> dict[str, float]:
        """Scores of every process's results against the split's ground truth."""

    # --- Pictures.
    @abc.abstractmethod
    def preview(self, example: dict[str, np.ndarray], labels: Labels) -> Image.Image:
        """One training example drawn from its target tokens, decoded back."""

    # --- Helpers for subclasses.
    def canvas_frame(self) -> np.ndarray:
        """Frame of the canvas itself: normalised coordinates → canvas pixels."""
        size = self.run.image_size
        return np.array([size, size, 0, 0], np.float32)


def one_example(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """Adds the leading example axis (n = 1) that `train_examples` returns."""
    return {k: v[None] for k, v in features.items()}
