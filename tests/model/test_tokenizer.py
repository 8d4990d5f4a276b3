"""The report tokenizer: training, round trip, special tokens, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import SPECIALS, Tokenizer, normalize

REPORTS = [
    "A 12 mm solid nodule in the right upper lobe. No pleural effusion.",
    "Centrilobular emphysema in both upper lobes, more on the left.",
    "No abnormalities detected.",
    "Small left pleural effusion (18 mm). Dependent atelectasis/consolidation in the left lower lobe.",
]


def test_round_trip_is_normal_form() -> None:
    tok = Tokenizer.train(REPORTS)
    for text in REPORTS:
        assert tok.decode(tok.encode(text)) == normalize(text)
        assert normalize(normalize(text)) == normalize(text)


def test_round_trip_exact_for_canonical_text() -> None:
    tok = Tokenizer.train(REPORTS)
    assert tok.decode(tok.encode(REPORTS[0])) == REPORTS[0]


def test_special_tokens_and_unknown_words() -> None:
    tok = Tokenizer.train(REPORTS)
    assert tok.vocab[:4] == SPECIALS
    ids = tok.encode("nodule zebra")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.unk_id in ids
    assert (
        tok.decode([tok.bos_id, *tok.encode("nodule", add_special=False), tok.eos_id, 5, 6])
        == "Nodule"
    )


def test_truncation_keeps_eos() -> None:
    tok = Tokenizer.train(REPORTS)
    ids = tok.encode(REPORTS[3], max_len=6)
    assert len(ids) == 6 and ids[-1] == tok.eos_id


def test_min_count_and_persistence(tmp_path: Path) -> None:
    tok = Tokenizer.train(REPORTS, min_count=2)
    assert "zebra" not in tok.vocab and "nodule" not in tok.vocab and "no" in tok.vocab
    path = tmp_path / "tok.json"
    tok.save(path)
    assert Tokenizer.load(path) == tok


def test_vocabulary_must_start_with_specials() -> None:
    with pytest.raises(ValueError, match="must start"):
        Tokenizer(("a", "b"))
