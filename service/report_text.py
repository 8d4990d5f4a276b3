"""The report text made to agree with the findings the SEG and SR carry.

UniCT writes its report from the visual memory and the findings token; the node decides,
gates and measures each finding afterwards (:mod:`service.postprocess`). A radiologist
reading both must not find a sentence that puts a finding on the other side, in another
lobe, or that states a finding the SEG does not show. :func:`reconcile_report` therefore
goes through the generated text sentence by sentence:

- a sentence stating a finding that has no segment (absent, or nothing of it left after
  gating) is removed;
- a sentence negating a finding that is present is removed;
- a sentence stating a present finding keeps its wording, with its location phrase (lobes,
  lung, side) replaced by where the SEG puts the finding, and a nodule's size and count by
  the measured ones; where the wording cannot carry the SEG's location (one side named,
  both segmented), the sentence is written anew from the measurements;
- a present finding with a segment that no sentence states gets a sentence;
- "No abnormalities detected." stays only when nothing is present.

:func:`location_agreement` is the check behind it: whether every side and lobe word of a
text matches the SEG, used to measure the model's own text before reconciliation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from model.phantom.reports import NO_ABNORMALITY, location_phrase, read_mentions
from service.findings import FindingResult
from service.lung_field import LOBE_NAMES, Side, lobe_side

_LOBE = r"(?:right|left) (?:upper|middle|lower) lobe"
#: Location phrases the report vocabulary uses (see model.phantom.reports.location_phrase).
_LOCATION = re.compile(
    rf"\bthe {_LOBE} and {_LOBE}\b|\bthe {_LOBE}\b|\b{_LOBE}\b|\bboth (?:upper|lower) lobes\b"
    r"|\bthe (?:right|left) lung\b|\bboth lungs\b|\bthe lungs\b",
    re.IGNORECASE,
)
_SIDE_WORD = re.compile(r"\b(right|left|bilateral|both)\b", re.IGNORECASE)
_SIZE = re.compile(r"\b\d+(?:\.\d+)?(?= ?mm\b)")
_PLURAL = re.compile(r"\b(nodules|masses|two|three|four|five|multiple)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?]+[.!?]?")
_NAME_BY_LOBE = {name: code for code, name in LOBE_NAMES.items()}
_COUNT_WORDS = {2: "Two", 3: "Three", 4: "Four", 5: "Five"}


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _reported(finding: FindingResult) -> bool:
    """Whether the SEG shows the finding."""
    return finding.present and finding.mask is not None


@dataclass(frozen=True)
class _Claim:
    """Where a sentence puts its finding."""

    sides: frozenset[Side]
    lobes: frozenset[int]

    @property
    def located(self) -> bool:
        return bool(self.sides or self.lobes)


def _claim(sentence: str) -> _Claim:
    """The sides and lobes a sentence names."""
    lower = sentence.lower()
    lobes: set[int] = set()
    sides: set[Side] = set()
    for match in _LOCATION.finditer(lower):
        phrase = match.group(0)
        for name, code in _NAME_BY_LOBE.items():
            if name in phrase:
                lobes.add(code)
        if phrase.startswith("both upper"):
            lobes |= {1, 4}
        elif phrase.startswith("both lower"):
            lobes |= {3, 5}
    rest = _LOCATION.sub(" ", lower)
    for word in _SIDE_WORD.findall(rest):
        if word in ("bilateral", "both"):
            sides |= {"right", "left"}
        elif word in ("right", "left"):
            sides.add("right" if word == "right" else "left")
    if "both lungs" in lower:
        sides |= {"right", "left"}
    for name in ("right", "left"):
        if f"the {name} lung" in lower:
            sides.add(name)  # type: ignore[arg-type]
    sides |= {lobe_side(code) for code in lobes}
    return _Claim(frozenset(sides), frozenset(lobes))


def _agrees(claim: _Claim, finding: FindingResult) -> bool:
    """Every side and lobe the sentence names is where the SEG puts the finding."""
    if not claim.located:
        return True
    sides = set(finding.sides)
    if not sides:
        # Without anatomy the SEG says nothing of sides: nothing to disagree with.
        return True
    if set(claim.sides) != sides:
        return False
    return not claim.lobes or set(claim.lobes) <= set(finding.lobes)


def _location(finding: FindingResult) -> str:
    if finding.lobes:
        return location_phrase(code - 1 for code in finding.lobes)
    sides = finding.sides
    if len(sides) == 1:
        return f"the {sides[0]} lung"
    return "both lungs" if sides else "the lungs"


def compose_sentence(finding: FindingResult) -> str:
    """A sentence stating a reported finding from its measurements."""
    key, loc = finding.abnormality.key, _location(finding)
    if key == "nodule" and finding.lesions:
        size = round(finding.lesions[0].longest_axial_diameter_mm)
        if finding.lesion_count == 1:
            return f"A {size} mm nodule in {loc}." if size < 30 else f"A {size} mm mass in {loc}."
        count = _COUNT_WORDS.get(finding.lesion_count, "Multiple")
        return f"{count} pulmonary nodules in {loc}, the largest measuring {size} mm."
    if key == "pleural_effusion" and finding.lesions:
        by_side: dict[str, float] = {}
        for lesion in finding.lesions:
            by_side[lesion.laterality] = by_side.get(lesion.laterality, 0.0) + lesion.volume_ml
        if {"right", "left"} <= set(by_side):
            return (
                f"Bilateral pleural effusions (right {by_side['right']:.0f} mL, "
                f"left {by_side['left']:.0f} mL)."
            )
        side = next(iter(by_side))
        side_word = (
            f"{side.capitalize()} pleural effusion" if side != "midline" else "Pleural effusion"
        )
        return f"{side_word} ({sum(by_side.values()):.0f} mL)."
    name = finding.abnormality.name.split(" / ")[0]
    return f"{name} in {loc}."


def _fix(sentence: str, finding: FindingResult) -> str:
    """The sentence with its location (and a nodule's size and count) from the SEG."""
    if finding.abnormality.key == "nodule" and finding.lesions:
        plural = bool(_PLURAL.search(sentence))
        if plural != (finding.lesion_count > 1):
            return compose_sentence(finding)
        sentence = _SIZE.sub(str(round(finding.lesions[0].longest_axial_diameter_mm)), sentence, 1)
    if not finding.sides:
        return sentence
    fixed = _LOCATION.sub(lambda m: _case_like(_location(finding), m.group(0)), sentence, 1)
    return fixed if _agrees(_claim(fixed), finding) else compose_sentence(finding)


def _case_like(phrase: str, original: str) -> str:
    return phrase[0].upper() + phrase[1:] if original[:1].isupper() else phrase


def reconcile_report(text: str, findings: Sequence[FindingResult]) -> str:
    """The report with every sentence agreeing with ``findings`` (see the module doc)."""
    positives: dict[int, str] = {}
    others: list[str] = []
    for sentence in _sentences(text):
        if sentence.rstrip(".").lower() == NO_ABNORMALITY.rstrip(".").lower():
            continue
        asserted, negated = read_mentions(sentence)
        if any(findings[int(i)].present for i in negated.nonzero()[0] if i < len(findings)):
            continue
        stated = [int(i) for i in asserted.nonzero()[0] if i < len(findings)]
        if not stated:
            others.append(sentence)
            continue
        if len(stated) > 1 or not _reported(findings[stated[0]]) or stated[0] in positives:
            continue
        positives[stated[0]] = _fix(sentence, findings[stated[0]])
    for finding in findings:
        if _reported(finding) and finding.index not in positives:
            positives[finding.index] = compose_sentence(finding)
    ordered = [positives[i] for i in sorted(positives)]
    if not ordered and not any(f.present for f in findings):
        ordered = [NO_ABNORMALITY]
    return " ".join([*ordered, *others])


@dataclass(frozen=True)
class Agreement:
    """How many sentences stating a finding agree with the SEG.

    Attributes
    ----------
    sentences
        Sentences that state a finding.
    agreeing
        Of those, the ones whose finding the SEG shows, on the sides and in the lobes
        the sentence names (a sentence naming none agrees when the SEG shows the finding).
    """

    sentences: int
    agreeing: int

    @property
    def rate(self) -> float:
        return self.agreeing / self.sentences if self.sentences else 1.0


def location_agreement(text: str, findings: Sequence[FindingResult]) -> Agreement:
    """Check every sentence of ``text`` that states a finding against the SEG's findings."""
    total = agreeing = 0
    for sentence in _sentences(text):
        asserted, _ = read_mentions(sentence)
        for i in asserted.nonzero()[0]:
            if i >= len(findings):
                continue
            total += 1
            finding = findings[int(i)]
            if _reported(finding) and _agrees(_claim(sentence), finding):
                agreeing += 1
    return Agreement(total, agreeing)
