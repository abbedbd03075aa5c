"""The built-in demo data set and its character tokenizer (no downloads, no files).

A generated instruction task a tiny model can visibly learn in a few hundred CPU steps:
continue the alphabet forwards or backwards from a letter to its end, e.g.
``"letters after t"`` -> ``"uvwxyz"``, ``"letters before d"`` -> ``"cba"``. Ten of the 48
prompts are held out: answering them needs the direction and the letter combined in a way
never trained on.
"""

from __future__ import annotations

import numpy as np

from falqon_jax.train.data import Example, Segment


class CharTokenizer:
    """Printable ASCII, one token per character: 0 pad, 1 BOS, 2 EOS, 3 newline, 4.. the
    characters ``' '`` to ``'~'``; anything else becomes ``'?'``."""

    pad_token_id, bos_token_id, eos_token_id, newline_id = 0, 1, 2, 3
    _first, _last = 32, 126
    vocab_size = 4 + _last - _first + 1

    def _id(self, char: str) -> int:
        if char == "\n":
            return self.newline_id
        code = ord(char) if self._first <= ord(char) <= self._last else ord("?")
        return 4 + code - self._first

    def encode(self, text: str) -> list[int]:
        return [self._id(c) for c in text]

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first EOS; special tokens are dropped."""
        chars = []
        for i in map(int, ids):
            if i == self.eos_token_id:
                break
            if i == self.newline_id:
                chars.append("\n")
            elif i >= 4:
                chars.append(chr(i - 4 + self._first))
        return "".join(chars)


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def answer(direction: str, letter: str) -> str:
    """The letters after (or before) ``letter`` up to the end (or start) of the alphabet."""
    start = LETTERS.index(letter)
    return LETTERS[start + 1 :] if direction == "after" else LETTERS[:start][::-1]


def prompt(direction: str, letter: str) -> str:
    return f"letters {direction} {letter}"


def make_examples(
    n: int = 2000, held_out: int = 10, seed: int = 1234
) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)``: ``held_out`` of the 48 (direction, letter) prompts are never
    trained on; ``n`` training examples are drawn from the others. Deterministic."""
    rng = np.random.default_rng(seed)
    pairs = [(d, c) for d in ("after", "before") for c in LETTERS[1:-1]]
    order = rng.permutation(len(pairs))
    unseen = [pairs[i] for i in order[:held_out]]
    seen = [pairs[i] for i in order[held_out:]]

    def example(pair):
        return [Segment(prompt(*pair), False), Segment(answer(*pair), True)]

    train = [example(seen[i]) for i in rng.integers(0, len(seen), n)]
    return train, [example(p) for p in unseen]
