"""Findings reports: writing them from lesions, and reading which abnormalities they assert.

:func:`compose_report` writes one sentence per present abnormality (label order, with
location, and size for nodules and effusions), then normal statements for a random subset
of the absent ones; a case without findings starts with ``"No abnormalities detected."``.

:func:`read_findings` is the label extractor behind the clinical-efficacy F1 of generated
reports: a keyword matcher with negation scope, exact on every report
:func:`compose_report` can write and tolerant of sloppy generated text (lower case,
missing punctuation, repeated sentences).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from model.labels import LABEL_KEYS
from model.phantom.anatomy import LOBES
from model.phantom.findings import PLEURAL_SPACE, Lesion

MAX_WORDS = 80
NO_ABNORMALITY = "No abnormalities detected."

_POSITIVE: dict[str, tuple[str, ...]] = {
    "bronchial_wall_thickening": (
        "Bronchial wall thickening in {loc}.",
        "Thickened bronchial walls are seen in {loc}.",
        "Mild bronchial wall thickening involving {loc}.",
    ),
    "bronchiectasis": (
        "Bronchiectasis in {loc}.",
        "Dilated bronchi consistent with bronchiectasis in {loc}.",
        "Cylindrical bronchiectasis is seen in {loc}.",
    ),
    "emphysema": (
        "Centrilobular emphysema in {loc}.",
        "Emphysematous changes are seen in {loc}.",
        "Areas of emphysema in {loc}.",
    ),
    "septal_thickening": (
        "Interlobular septal thickening in {loc}.",
        "Subpleural reticulation in {loc}.",
        "Reticular opacities with septal thickening in {loc}.",
    ),
    "micronodules": (
        "Centrilobular micronodules in {loc}.",
        "Multiple micronodules are seen in {loc}.",
        "A cluster of micronodules in {loc}.",
    ),
    "linear_opacities": (
        "Linear opacities in {loc}.",
        "Subsegmental linear atelectasis in {loc}.",
        "Linear scarring in {loc}.",
    ),
    "consolidation": (
        "Consolidation in {loc}.",
        "Airspace consolidation is seen in {loc}.",
        "Atelectasis and consolidation in {loc}.",
    ),
    "ground_glass_opacity": (
        "Ground-glass opacity in {loc}.",
        "Patchy ground-glass opacities in {loc}.",
        "Hazy ground-glass attenuation in {loc}.",
    ),
}
_NODULE_ONE = (
    "A {size} mm nodule in {loc}.",
    "Solid pulmonary nodule measuring {size} mm in {loc}.",
    "There is a {size} mm solid nodule in {loc}.",
)
_MASS = "A {size} mm mass in {loc}."
_NODULE_MANY = (
    "{count} pulmonary nodules in {loc}, the largest measuring {size} mm.",
    "Multiple solid nodules in {loc}, up to {size} mm.",
    "{count} nodules are seen in {loc}, the largest {size} mm.",
)
_EFFUSION_ONE = (
    "{grade} {side} pleural effusion measuring {size} mm.",
    "There is a {grade_lc} {side} pleural effusion with a depth of {size} mm.",
    "{side_cap} pleural effusion, {size} mm in depth.",
)
_EFFUSION_BOTH = (
    "Bilateral pleural effusions, up to {size} mm in depth.",
    "{grade} bilateral pleural effusions measuring up to {size} mm.",
    "There are {grade_lc} bilateral pleural effusions of up to {size} mm.",
)
_NEGATIVE_FORMS = ("No {term}.", "There is no {term}.", "No evidence of {term}.")
_NEGATIVE_TERMS: dict[str, tuple[str, ...]] = {
    "bronchial_wall_thickening": ("bronchial wall thickening",),
    "bronchiectasis": ("bronchiectasis",),
    "emphysema": ("emphysema",),
    "septal_thickening": ("septal thickening", "interlobular septal thickening"),
    "micronodules": ("micronodules",),
    "linear_opacities": ("linear opacities",),
    "consolidation": ("consolidation", "focal consolidation"),
    "ground_glass_opacity": ("ground-glass opacity",),
    "nodule": ("suspicious pulmonary nodule", "pulmonary nodules"),
    "pleural_effusion": ("pleural effusion",),
}
_PLURAL_TERMS = frozenset({"micronodules", "linear opacities", "pulmonary nodules"})
_COUNTS = {2: "Two", 3: "Three", 4: "Four", 5: "Five"}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _location(lesions: Sequence[Lesion]) -> str:
    return location_phrase(LOBES.index(les.location) for les in lesions if les.location in LOBES)


def location_phrase(lobe_indices: Iterable[int]) -> str:
    """Where findings in these lobes (indices into :data:`LOBES`) are, as a report says it."""
    lobes = sorted(set(lobe_indices))
    if not lobes:
        return "the lungs"
    if len(lobes) == 1:
        return f"the {LOBES[lobes[0]]}"
    if lobes == [2, 4]:
        return "both lower lobes"
    if lobes == [0, 3]:
        return "both upper lobes"
    if len(lobes) == 2:
        return f"the {LOBES[lobes[0]]} and {LOBES[lobes[1]]}"
    if all(lb < 3 for lb in lobes):
        return "the right lung"
    if all(lb >= 3 for lb in lobes):
        return "the left lung"
    return "both lungs"


def _grade(depth: float) -> str:
    return "Small" if depth < 20 else "Moderate" if depth < 35 else "Large"


def _positive(label: str, lesions: Sequence[Lesion], rng: np.random.Generator) -> str:
    loc = _location(lesions)
    if label == "nodule":
        size = round(max(les.size_mm for les in lesions))
        if len(lesions) == 1:
            options = (*_NODULE_ONE, _MASS) if size >= 30 else _NODULE_ONE
            return _pick(rng, options).format(size=size, loc=loc)
        count = _COUNTS.get(len(lesions), "Multiple")
        return _pick(rng, _NODULE_MANY).format(count=count, size=size, loc=loc)
    if label == "pleural_effusion":
        size = round(max(les.size_mm for les in lesions))
        grade = _grade(size)
        sides = {les.location for les in lesions}
        if len(sides) > 1:
            return _pick(rng, _EFFUSION_BOTH).format(size=size, grade=grade, grade_lc=grade.lower())
        side = "right" if sides == {PLEURAL_SPACE[0]} else "left"
        return _pick(rng, _EFFUSION_ONE).format(
            size=size, grade=grade, grade_lc=grade.lower(), side=side, side_cap=side.capitalize()
        )
    return _pick(rng, _POSITIVE[label]).format(loc=loc)


def _words(text: str) -> int:
    return len(text.split())


def compose_report(lesions: Sequence[Lesion], rng: np.random.Generator) -> str:
    """Write the findings report of a case.

    Parameters
    ----------
    lesions
        The case's lesions; labels with at least one lesion are reported present.
    rng
        Chooses phrasings and which absent findings get a normal statement.

    Returns
    -------
    At most :data:`MAX_WORDS` words: one sentence per present abnormality in label order,
    then normal statements; ``"No abnormalities detected."`` first when nothing is present.
    """
    by_label: dict[str, list[Lesion]] = {}
    for les in lesions:
        by_label.setdefault(les.label, []).append(les)
    sentences = [_positive(key, by_label[key], rng) for key in LABEL_KEYS if key in by_label]
    if not sentences:
        sentences = [NO_ABNORMALITY]
    absent = [key for key in LABEL_KEYS if key not in by_label]
    n_negative = int(rng.integers(0, len(absent) + 1)) if absent else 0
    chosen = (
        sorted(rng.choice(len(absent), size=n_negative, replace=False).tolist())
        if n_negative
        else []
    )
    budget = MAX_WORDS - sum(_words(s) for s in sentences)
    for i in chosen:
        key = absent[i]
        term = _pick(rng, _NEGATIVE_TERMS[key])
        form = _pick(rng, _NEGATIVE_FORMS)
        if term in _PLURAL_TERMS:
            form = form.replace("There is", "There are")
        sentence = form.format(term=term)
        sentence = sentence[0].upper() + sentence[1:]
        if _words(sentence) <= budget:
            sentences.append(sentence)
            budget -= _words(sentence)
    return " ".join(sentences)


# ---------------------------------------------------------------------------- reading
_MENTIONS: dict[str, tuple[str, ...]] = {
    "bronchial_wall_thickening": (
        "bronchial wall thickening",
        "thickened bronchial walls",
        "thickened bronchial wall",
        "bronchial walls",
        "bronchial wall",
        "peribronchial thickening",
        "peribronchial cuffing",
    ),
    "bronchiectasis": (
        "bronchiectasis",
        "bronchiectatic",
        "dilated bronchi",
        "dilated bronchus",
        "bronchial dilatation",
    ),
    "emphysema": ("emphysema", "emphysematous"),
    "septal_thickening": (
        "septal thickening",
        "interlobular septal",
        "septal lines",
        "reticulation",
        "reticular",
    ),
    "micronodules": ("micronodules", "micronodule", "micronodular", "tree in bud"),
    "linear_opacities": (
        "linear opacities",
        "linear opacity",
        "linear atelectasis",
        "subsegmental atelectasis",
        "plate like atelectasis",
        "linear scarring",
        "linear scar",
        "linear bands",
        "linear band",
        "fibrotic bands",
        "fibrotic band",
    ),
    "consolidation": (
        "consolidation",
        "consolidations",
        "consolidative",
        "atelectasis",
        "airspace disease",
    ),
    "ground_glass_opacity": ("ground glass", "groundglass"),
    "nodule": ("nodule", "nodules", "mass", "masses"),
    "pleural_effusion": (
        "pleural effusion",
        "pleural effusions",
        "effusion",
        "effusions",
        "pleural thickening",
        "pleural fluid",
    ),
}
_PATTERNS: list[tuple[tuple[str, ...], int]] = sorted(
    ((tuple(p.split()), LABEL_KEYS.index(key)) for key, ps in _MENTIONS.items() for p in ps),
    key=lambda item: -len(item[0]),
)
_CUES = frozenset({"no", "without", "nor", "negative", "free", "absence", "absent"})
_FILLERS = frozenset(
    {
        "evidence", "of", "for", "any", "other", "new", "definite", "significant", "suspicious",
        "pulmonary", "focal", "interlobular", "acute", "is", "are", "there", "seen", "a", "an",
        "the", "convincing", "frank", "visible", "obvious", "additional", "further", "solid",
        "right", "left", "bilateral", "small", "large", "sign", "signs",
    }
)  # fmt: skip
_CONJUNCTIONS = frozenset({"or", "nor"})
_TOKEN = re.compile(r"[a-z]+|[0-9]+(?:\.[0-9]+)?|[.;:!?\n]|,")


def _tokens(text: str) -> list[str]:
    text = text.lower().replace("-", " ")
    return ["|" if t in ".;:!?\n" else t for t in _TOKEN.findall(text)]


def read_findings(text: str) -> npt.NDArray[np.bool_]:
    """Which abnormalities a report asserts as present (see :func:`read_mentions`)."""
    return read_mentions(text)[0]


def read_mentions(text: str) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Which abnormalities a report asserts as present, and which it negates.

    Parameters
    ----------
    text
        A findings report, generated or written.

    Returns
    -------
    Two ``(10,)`` bool arrays in :data:`model.labels.LABEL_KEYS` order: present and
    negated. A mention counts unless a negation cue (``no``, ``without``...) precedes it
    in the same clause with only filler words between (or a conjunction continues a
    negated list); an abnormality is present when at least one of its mentions is not
    negated, negated when at least one is.
    """
    tokens = _tokens(text)
    present = np.zeros(len(LABEL_KEYS), dtype=np.bool_)
    negated = np.zeros(len(LABEL_KEYS), dtype=np.bool_)
    negating = False  # inside a negation scope
    after_negated = False  # just after a negated mention (a conjunction may continue the list)
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        match = next(
            ((pat, label) for pat, label in _PATTERNS if tuple(tokens[i : i + len(pat)]) == pat),
            None,
        )
        if match is not None:
            pat, label = match
            if negating:
                negated[label] = True
            else:
                present[label] = True
            after_negated = negating
            negating = False
            i += len(pat)
            continue
        if tok in _CUES or (tok in _CONJUNCTIONS and after_negated):
            negating, after_negated = True, False
        elif tok in _FILLERS and negating:
            pass
        else:
            negating, after_negated = False, False
        i += 1
    return present, negated
