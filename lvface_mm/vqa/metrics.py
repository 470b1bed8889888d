"""Scores for identity-grounded VQA, computed from (sample, predicted text) pairs.

Definitions follow the personalised-VLM literature (reference/vlm_bridge.md §5):

- recognition ("Is <name> in this photo?"): accuracy on positives, on negatives, and their mean
  ("weighted" accuracy, as Yo'LLaVA and RAP report it, because negatives usually dominate).
- captions: name precision / recall / F1, micro-averaged over samples (RAP's caption metric):
  a predicted name is correct if that person is in the photo.
- hallucinated-name rate: share of answers (captions, naming, unknown-person questions) that say a
  name of someone who is not in the photo.
- naming accuracy: the answer says the expected name(s) and no other known name.
- unknown-person abstention: on questions about someone the model must not name, the share of
  answers that abstain and name nobody.
- counting accuracy, and text-only QA as normalised containment of the reference answer.
- region accuracy (questions that link an identity to its part of the picture, `scenes.py`):
  normalised containment of the reference answer ("red cup", a name, "yes"/"no").

Names are found by whole-word, case-insensitive matching against a vocabulary (enrolled names
plus distractor names), longest name first so "Anna Lee" is not also counted as "Anna".
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .schema import Sample

ABSTAIN_PATTERNS = (
    r"\bunknown\b",
    r"\bdon'?t know\b",
    r"\bdo not know\b",
    r"\bnot sure\b",
    r"\bcan(?:not|'?t) (?:tell|identify|recogni[sz]e|say)\b",
    r"\bno idea\b",
    r"\bnot (?:someone|anyone|a person) i (?:know|recogni[sz]e)\b",
    r"\bdon'?t recogni[sz]e\b",
    r"\bdo not recogni[sz]e\b",
)
_ABSTAIN_RE = re.compile("|".join(ABSTAIN_PATTERNS), re.IGNORECASE)
_YES_RE = re.compile(r"^\W*(yes|yeah|yep|correct|true)\b", re.IGNORECASE)
_NO_RE = re.compile(r"^\W*(no|nope|false)\b", re.IGNORECASE)
_NUMBER_WORDS = {
    "zero": 0,
    "no one": 0,
    "nobody": 0,
    "one": 1,
    "a single": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
_NUMBER_RE = re.compile(r"\b(\d+|" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + r")\b", re.IGNORECASE)
_ARTICLES = {"a", "an", "the"}


def parse_yes_no(text: str) -> bool | None:
    """True for an answer that starts with yes, False for one starting with no, else None."""
    if _YES_RE.match(text):
        return True
    if _NO_RE.match(text):
        return False
    return None


def parse_count(text: str) -> int | None:
    """The first number in the answer (digits or a number word up to ten)."""
    m = _NUMBER_RE.search(text)
    if m is None:
        return None
    token = m.group(1).lower()
    return int(token) if token.isdigit() else _NUMBER_WORDS[token]


def is_abstention(text: str) -> bool:
    return _ABSTAIN_RE.search(text) is not None


class NameMatcher:
    """Finds vocabulary names in free text (whole words, case-insensitive, longest first)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = sorted({n for n in names if n}, key=lambda n: (-len(n), n))
        if self.names:
            alternatives = "|".join(re.escape(n) for n in self.names)
            self._re = re.compile(rf"(?<!\w)({alternatives})(?!\w)", re.IGNORECASE)
        self._canon = {n.lower(): n for n in self.names}

    def find(self, text: str) -> set[str]:
        if not self.names:
            return set()
        return {self._canon[m.group(1).lower()] for m in self._re.finditer(text)}


def normalize_answer(text: str) -> list[str]:
    """Lower-case words without punctuation or articles (SQuAD-style normalisation)."""
    table = str.maketrans({c: " " for c in string.punctuation})
    return [w for w in text.lower().translate(table).split() if w not in _ARTICLES]


def contains_answer(prediction: str, reference: str) -> bool:
    """The normalised reference appears as a contiguous word sequence in the normalised prediction."""
    ref, pred = normalize_answer(reference), normalize_answer(prediction)
    if not ref:
        return not pred
    return any(pred[i : i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1))


@dataclass
class _Ratio:
    hit: float = 0.0
    total: float = 0.0

    def add(self, hit: float, total: float = 1.0) -> None:
        self.hit += hit
        self.total += total

    @property
    def value(self) -> float | None:
        return self.hit / self.total if self.total else None


class _Tally:
    """Running counts for every metric; `add` scores one answer."""

    def __init__(self, matcher: NameMatcher) -> None:
        self.matcher = matcher
        self.rec_pos, self.rec_neg, self.naming, self.abstain = _Ratio(), _Ratio(), _Ratio(), _Ratio()
        self.counting, self.text_qa, self.halluc = _Ratio(), _Ratio(), _Ratio()
        self.region = _Ratio()
        self.tp = self.n_pred = self.n_true = 0
        self.counts: dict[str, int] = {}

    def add(self, s: Sample, pred: str) -> None:
        self.counts[s.task] = self.counts.get(s.task, 0) + 1
        said = self.matcher.find(pred)
        named_absent = float(bool(said - set(s.names_present())))
        if s.task == "recognition":
            yes = parse_yes_no(pred)
            if s.target["answer"] == "yes":
                self.rec_pos.add(float(yes is True))
            else:
                self.rec_neg.add(float(yes is False))
        elif s.task == "naming":
            self.naming.add(float(said == set(s.target["names"])))
            self.halluc.add(named_absent)
        elif s.task == "unknown":
            self.abstain.add(float(is_abstention(pred) and not said))
            self.halluc.add(named_absent)
        elif s.task == "caption":
            expected = set(s.target["names"])
            self.tp += len(said & expected)
            self.n_pred += len(said)
            self.n_true += len(expected)
            self.halluc.add(named_absent)
        elif s.task == "counting":
            self.counting.add(float(parse_count(pred) == s.target["count"]))
        elif s.task == "text_qa":
            self.text_qa.add(float(contains_answer(pred, s.target["answer"])))
        elif s.task == "region":
            self.region.add(float(contains_answer(pred, s.target["answer"])))
            self.halluc.add(named_absent)

    def result(self) -> dict[str, float | int | None]:
        precision = self.tp / self.n_pred if self.n_pred else None
        recall = self.tp / self.n_true if self.n_true else None
        f1 = None
        if precision is not None and recall is not None:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        pos, neg = self.rec_pos.value, self.rec_neg.value
        out: dict[str, float | int | None] = {
            "recognition_pos_acc": pos,
            "recognition_neg_acc": neg,
            "recognition_weighted_acc": None if pos is None or neg is None else (pos + neg) / 2,
            "naming_acc": self.naming.value,
            "caption_precision": precision,
            "caption_recall": recall,
            "caption_f1": f1,
            "hallucinated_name_rate": self.halluc.value,
            "unknown_abstention": self.abstain.value,
            "counting_acc": self.counting.value,
            "text_qa_acc": self.text_qa.value,
            "region_acc": self.region.value,
        }
        out.update({f"n_{task}": n for task, n in sorted(self.counts.items())})
        return out


def score_predictions(
    samples: Sequence[Sample],
    predictions: Mapping[str, str],
    vocabulary: Iterable[str] = (),
) -> dict[str, float | int | None]:
    """All metrics for one model on one evaluation set.

    Args:
        samples: evaluation samples; each sample's `target` says what is expected.
        predictions: sample id -> generated answer text. Every sample must have one.
        vocabulary: every name a model might say (enrolled and distractor names). Names in the
            samples' targets and faces are added automatically.

    Returns:
        metric name -> value (None where the set has no sample of that kind), plus `n_<task>` counts.
        Rates are fractions in [0, 1].
    """
    missing = [s.id for s in samples if s.id not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} sample(s), e.g. {missing[:5]}")
    vocab = set(vocabulary)
    for s in samples:
        vocab.update(s.names_present())
        vocab.update(n for n in s.target.get("names", ()) if isinstance(n, str))
        if isinstance(s.target.get("query"), str):
            vocab.add(s.target["query"])
    tally = _Tally(NameMatcher(vocab))
    for s in samples:
        tally.add(s, predictions[s.id])
    return tally.result()


# Which metrics go in the summary table, in order, with their direction (higher is better?).
SUMMARY_METRICS: tuple[tuple[str, bool], ...] = (
    ("recognition_pos_acc", True),
    ("recognition_neg_acc", True),
    ("recognition_weighted_acc", True),
    ("naming_acc", True),
    ("caption_precision", True),
    ("caption_recall", True),
    ("caption_f1", True),
    ("hallucinated_name_rate", False),
    ("unknown_abstention", True),
    ("counting_acc", True),
    ("text_qa_acc", True),
    ("region_acc", True),
)
