"""Answer grammars: which tokens may come next, as a small automaton.

Sampling from a model that is young, small or shown an odd image can write
tokens that no codec reads (a class where a coordinate belongs, half a
separator, a keypoint with one coordinate). Constrained decoding rules them
out before they are drawn: each task describes its answers as a grammar and
the sampler masks every token the grammar does not allow next
(`decoding.sample_sequences(grammar=...)`).

A grammar sorts the vocabulary into a few *kinds* (coordinate, class,
separator, EOS, ...) and has named *states*. In state s a token of kind k
may be sampled when `allowed[s, k]`, and it moves the sequence to state
`next_state[s, k]`. Kinds keep the tables tiny (states x kinds) whatever the
vocabulary size; tokens of no kind are never allowed.

    g = Grammar.build(
        kinds={"coord": is_coord, "eos": tokens == EOS},
        transitions={"y": {"coord": "x", "eos": "end"}, "x": {"coord": "y"}, "end": {"eos": "end"}},
        start="y",
    )

Scores are not affected: the sampler still reports probabilities under the
raw logits, so a detection's class score keeps the mass the model gave to
tokens the grammar ruled out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from unified_seq import vocab


@dataclasses.dataclass(frozen=True, eq=False)
class Grammar:
    """A finite automaton over the token space.

    Attributes:
      kinds: int32[V], the kind of every token (-1: no kind, never allowed).
      allowed: bool[S, K], kind k may follow in state s.
      next_state: int32[S, K], the state after a token of kind k in state s.
      start: the state of the first answer token.
      state_names: S names, for messages.
      kind_names: K names, for messages.
    """

    kinds: np.ndarray
    allowed: np.ndarray
    next_state: np.ndarray
    start: int = 0
    state_names: tuple[str, ...] = ()
    kind_names: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        kinds: Mapping[str, np.ndarray],
        transitions: Mapping[str, Mapping[str, str]],
        start: str,
    ) -> Grammar:
        """A grammar from named token kinds and named state transitions.

        Args:
          kinds: kind name → bool[V] tokens of that kind; kinds must not overlap.
          transitions: state name → {kind name → next state name}; a kind not
            listed is not allowed in that state. Every state needs at least
            one allowed kind (the sampler must always have a token to draw).
          start: name of the first state.

        Raises:
          ValueError: overlapping kinds, an unknown kind or state, or a state
            that allows nothing.
        """
        kind_names = tuple(kinds)
        masks = np.stack([np.asarray(kinds[k], bool) for k in kind_names])
        if (masks.sum(axis=0) > 1).any():
            token = int(np.flatnonzero(masks.sum(axis=0) > 1)[0])
            raise ValueError(f"grammar kinds overlap at token {token}")
        kind_of = np.where(masks.any(axis=0), masks.argmax(axis=0), -1).astype(np.int32)
        state_names = tuple(transitions)
        index = {name: i for i, name in enumerate(state_names)}
        if start not in index:
            raise ValueError(f"grammar start state {start!r} has no transitions")
        allowed = np.zeros([len(state_names), len(kind_names)], bool)
        next_state = np.zeros([len(state_names), len(kind_names)], np.int32)
        for state, moves in transitions.items():
            if not moves:
                raise ValueError(f"grammar state {state!r} allows no token")
            for kind, target in moves.items():
                if kind not in kind_names:
                    raise ValueError(f"grammar state {state!r}: unknown kind {kind!r}")
                if target not in index:
                    raise ValueError(f"grammar state {state!r}: unknown next state {target!r}")
                k = kind_names.index(kind)
                if not masks[k].any():
                    raise ValueError(f"grammar kind {kind!r} holds no token")
                allowed[index[state], k] = True
                next_state[index[state], k] = index[target]
        return cls(kind_of, allowed, next_state, index[start], state_names, kind_names)

    @classmethod
    def periodic(cls, token_mask: np.ndarray) -> Grammar:
        """Answer token i may be a token allowed by row i % P of bool[P, V]."""
        token_mask = np.asarray(token_mask, bool)
        period = token_mask.shape[0]
        # A kind per distinct column: tokens allowed in exactly the same rows.
        columns, kind_of = np.unique(token_mask.T, axis=0, return_inverse=True)
        allowed = columns.T
        if not allowed.any(axis=1).all():
            raise ValueError("every row of a token mask must allow at least one token")
        next_state = np.tile((np.arange(period, dtype=np.int32) + 1)[:, None] % period,
                             [1, len(columns)])  # fmt: skip
        return cls(kind_of.reshape(-1).astype(np.int32), allowed, next_state, 0)

    @property
    def vocab_size(self) -> int:
        return len(self.kinds)

    def token_masks(self) -> np.ndarray:
        """bool[S, V]: the tokens allowed in each state."""
        valid = self.kinds >= 0
        return self.allowed[:, np.maximum(self.kinds, 0)] & valid

    def violation(self, tokens: Sequence[int], stop: int | None = vocab.EOS) -> str | None:
        """Why `tokens` break the grammar, or None when every token is allowed.

        Reads up to and including the first `stop` token (None: all tokens).
        """
        state = self.start
        for i, token in enumerate(np.asarray(tokens).reshape(-1).tolist()):
            kind = int(self.kinds[token]) if 0 <= token < len(self.kinds) else -1
            if kind < 0 or not self.allowed[state, kind]:
                name = self.state_names[state] if self.state_names else str(state)
                if kind < 0:
                    what = "a token of no kind"
                else:
                    what = f"kind {self.kind_names[kind] if self.kind_names else kind}"
                return f"token {token} ({what}) at position {i} in state {name}"
            state = int(self.next_state[state, kind])
            if stop is not None and token == stop:
                break
        return None
