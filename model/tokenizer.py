"""A word-level report tokenizer trained on our own report corpus.

Reports are lower-cased and split into words, numbers and punctuation; the vocabulary is
every token seen at least ``min_count`` times in the training reports, after the special
tokens. Decoding joins tokens back into sentences with the usual spacing and capitals, so
``decode(encode(text)) == normalize(text)``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[a-z]+(?:[-'][a-z]+)*|[.,;:/()%]")
_NO_SPACE_BEFORE = {".", ",", ";", ":", ")", "%"}
_NO_SPACE_AFTER = {"(", "/"}


def split_words(text: str) -> list[str]:
    """Lower-case word/number/punctuation tokens of ``text``."""
    return _TOKEN_RE.findall(text.lower())


def join_words(words: Sequence[str]) -> str:
    """Join tokens with natural spacing and capitalise each sentence."""
    out: list[str] = []
    for i, w in enumerate(words):
        if i and w not in _NO_SPACE_BEFORE and words[i - 1] not in _NO_SPACE_AFTER and w != "/":
            out.append(" ")
        out.append(w)
    text = "".join(out)
    return re.sub(r"(^|[.]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def normalize(text: str) -> str:
    """The canonical form of a report: what a round trip through the tokenizer gives."""
    return join_words(split_words(text))


@dataclass(frozen=True)
class Tokenizer:
    """Word-level tokenizer; ids 0-3 are ``<pad> <bos> <eos> <unk>``."""

    vocab: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.vocab[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.vocab)})

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def __len__(self) -> int:
        return len(self.vocab)

    @classmethod
    def train(cls, texts: Iterable[str], min_count: int = 1) -> Tokenizer:
        """Learn the vocabulary from ``texts`` (most frequent first, ties alphabetical)."""
        counts = Counter(w for t in texts for w in split_words(t))
        words = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(SPECIALS + tuple(words))

    def encode(self, text: str, add_special: bool = True, max_len: int | None = None) -> list[int]:
        """Token ids of ``text``, wrapped in BOS/EOS when ``add_special``; truncated to ``max_len``."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        ids = [index.get(w, self.unk_id) for w in split_words(text)]
        if add_special:
            ids = [self.bos_id, *ids, self.eos_id]
        if max_len is not None and len(ids) > max_len:
            ids = ids[:max_len]
            if add_special:
                ids[-1] = self.eos_id
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; stops at EOS, skips BOS and padding."""
        words: list[str] = []
        for i in ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.vocab[i] if 0 <= i < len(self.vocab) else UNK)
        return join_words(words)

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON."""
        path.write_text(
            json.dumps({"type": "word", "vocab": list(self.vocab)}, indent=0) + "\n",
            encoding="utf-8",
        )

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """Read a vocabulary written by :meth:`save`."""
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("type") != "word":
            raise ValueError(f"{path}: not a word tokenizer file")
        return cls(tuple(data["vocab"]))
