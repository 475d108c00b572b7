"""Scorers for generated answers against reference answers, and the summary statistics of
``edge-tune eval``. Pure Python (no numpy, no model): every function here is a formula.

Answer scorers (each ``(prediction, reference) -> value``):

* **exact match** — the two texts are equal after :func:`normalize` (Unicode NFKC, case
  folded, whitespace runs collapsed to one space, ends stripped); 1.0 or 0.0.
* **contains** — the normalized reference occurs inside the normalized prediction (the
  answer says the reference, maybe with more words around it); 1.0 or 0.0.
* **ROUGE-L** — the F-measure of the longest common subsequence of the two token sequences
  (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3.1):
  ``R = LCS/len(reference)``, ``P = LCS/len(prediction)``, ``F = (1+β²)RP / (R+β²P)`` with
  β = 1, as Google's ``rouge-score`` package computes ``rougeL``. Tokens are the lowercased
  runs of letters and digits (:func:`rouge_tokens`): on ASCII text exactly ``rouge-score``'s
  default tokenizer (``[^a-z0-9]+`` splits), and letters of other scripts are kept rather than
  dropped. No stemming. 0.0 when either side has no token.
* **valid JSON** — scored only where the reference is a JSON object or array
  (:func:`reference_is_json`): the prediction, with a Markdown code fence around it removed,
  parses as JSON (``json.loads``); 1.0 or 0.0. None elsewhere.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; "_" splits like punctuation
_FENCE = re.compile(r"^```[\w-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def normalize(text: str) -> str:
    """NFKC, case folded, whitespace runs as one space, ends stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized texts are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalized reference occurs in the normalized prediction, else 0.0 (an
    empty reference counts as not contained: it would match everything)."""
    ref = normalize(reference)
    return float(bool(ref) and ref in normalize(prediction))


def rouge_tokens(text: str) -> list[str]:
    """Lowercased runs of letters and digits: ``"Arr, matey!"`` -> ``["arr", "matey"]``."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming,
    O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure in [0, 1] (see the module docstring)."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(ref), lcs / len(pred)
    return (1 + beta ** 2) * recall * precision / (recall + beta ** 2 * precision)


def reference_is_json(reference: str) -> bool:
    """Whether the reference is a JSON object or array (a bare number or word is not: those
    are ordinary short answers)."""
    text = reference.strip()
    if not text or text[0] not in "[{":
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def valid_json(prediction: str) -> float:
    """1.0 when the prediction parses as JSON (a surrounding Markdown code fence is allowed:
    chat models often add one), else 0.0."""
    text = prediction.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        json.loads(text)
    except ValueError:
        return 0.0
    return 1.0


@dataclass
class AnswerScore:
    """The scores of one generated answer; ``json_valid`` is None where the reference is not
    JSON."""
    exact: float
    contains: float
    rouge_l: float
    json_valid: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


SCORES = ("exact", "contains", "rouge_l", "json_valid")


def score_answer(prediction: str, reference: str) -> AnswerScore:
    """Every scorer on one (prediction, reference) pair."""
    return AnswerScore(exact=exact_match(prediction, reference),
                       contains=contains(prediction, reference),
                       rouge_l=rouge_l(prediction, reference),
                       json_valid=valid_json(prediction) if reference_is_json(reference)
                       else None)


def mean_scores(scores: Iterable[AnswerScore]) -> dict[str, Optional[float]]:
    """The mean of each score over the answers it applies to (None: it applies to none)."""
    rows = [s.to_dict() for s in scores]
    out: dict[str, Optional[float]] = {}
    for name in SCORES:
        values = [r[name] for r in rows if r[name] is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


def perplexity(mean_nll: float) -> float:
    """``exp(mean negative log-likelihood per token)`` (natural log); inf on overflow."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
