"""Evaluation metrics, implemented here so the node has no scikit-learn/NLTK dependency.

Classification: F1 at thresholds, AUROC (Mann-Whitney), average precision. Segmentation:
Dice. Reports: corpus BLEU-4 (Papineni et al. 2002, brevity penalty, no smoothing),
ROUGE-L (LCS F-measure, beta = 1.2 as in Lin 2004), clinical-efficacy F1 from findings
read back out of the text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata


def f1_score(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Binary F1; 1.0 when there are neither positives nor predicted positives."""
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    tp = float((t & p).sum())
    fp = float((~t & p).sum())
    fn = float((t & ~p).sum())
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def auroc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    t = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[t].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Average precision (area under precision-recall, step-wise); NaN without positives."""
    t = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if not t.any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    hits = t[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def dice(pred: npt.ArrayLike, target: npt.ArrayLike) -> float:
    """Dice coefficient of two binary masks; 1.0 when both are empty."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(target, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(
    references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """Corpus BLEU-n with one reference per hypothesis."""
    matches = [0] * max_n
    totals = [0] * max_n
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        ref_len += len(ref)
        hyp_len += len(hyp)
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: Sequence[str], hypothesis: Sequence[str], beta: float = 1.2) -> float:
    """ROUGE-L F-measure of one pair."""
    if not reference or not hypothesis:
        return 0.0
    lcs = _lcs(reference, hypothesis)
    if lcs == 0:
        return 0.0
    r, p = lcs / len(reference), lcs / len(hypothesis)
    return (1 + beta**2) * r * p / (r + beta**2 * p)
