"""Rule rewards for verifiable answers, in a registry chosen per data source of the blend.

A blend source of a GSPO stage names its rewards and their weights (`BlendSource.rewards`, e.g.
``{numeric: 1.0, format: 0.1}``); a rollout's reward is the weighted sum.  Every rule reads the
manifest row's checkable target (`RewardTarget.from_row`: ``metadata.answer``, plus optional
``metadata.choices`` / ``metadata.tolerance`` / ``metadata.format``) and the decoded response text,
and returns a float in [0, 1].

Answers are read after the last ``Answer:`` when the response has one (the demo prompts ask for
"Answer: <x>"), else from the whole response -- so a model that answers in a sentence
("3 plus 4 is 7.") is still checkable by the numeric and letter rules.

* ``exact_match``     -- normalised string equality (case, surrounding whitespace and punctuation,
                         inner whitespace runs, a leading article ignored)
* ``multiple_choice`` -- the one option letter the answer names ("B", "(B)", "B.", "B) ...",
                         "option B", or the option text itself); several different letters = 0
* ``numeric``         -- the last number of the answer (digits, sign, decimals, thousands commas,
                         a/b fractions, number words zero..twenty) within
                         ``tolerance`` = max(abs_tol, rel_tol * |answer|)
* ``format``          -- the whole response fits ``metadata.format`` (a regex; default: one line
                         ``Answer: <something>``)
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

__all__ = ["DEFAULT_FORMAT", "REWARDS", "RewardError", "RewardTarget", "answer_text", "combined_reward",
           "exact_match", "format_reward", "multiple_choice", "numeric", "parse_number", "check_reward_weights"]

DEFAULT_FORMAT = r"Answer:[ \t]*\S[^\n]*"
_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:\-]\s*", re.IGNORECASE)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER = re.compile(r"(?<![\w.])[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\w])"
                     r"|(?<![\w.])[-+\u2212]?\.\d+(?![\w])"
                     r"|\b(?:" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_PUNCT = string.punctuation + "\u201c\u201d\u2018\u2019"


class RewardError(ValueError):
    """A row of a GSPO source lacks what its reward rule checks; the message names the row and the fix."""


@dataclass(frozen=True)
class RewardTarget:
    answer: str  # the checkable answer: text, an option letter, or a number
    choices: Optional[Sequence[str]] = None  # option texts, letter A first (multiple choice)
    tolerance: Optional[float] = None  # absolute tolerance of a numeric answer (None = rule default)
    format: Optional[str] = None  # regex the whole response must fit (format rule)
    where: str = ""  # manifest path:line, for errors

    @classmethod
    def from_row(cls, metadata: Mapping, where: str) -> "RewardTarget":
        answer = metadata.get("answer")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or str(answer).strip() == "":
            raise RewardError(f"{where}: a GSPO sample needs metadata.answer (str or number) holding the "
                              f"checkable answer; add it, or drop the source from the GSPO blend")
        choices = metadata.get("choices")
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
                                    or not 2 <= len(choices) <= 26):
            raise RewardError(f"{where}: metadata.choices must be a list of 2-26 option texts (A first)")
        tol = metadata.get("tolerance")
        if tol is not None and (not isinstance(tol, (int, float)) or tol < 0):
            raise RewardError(f"{where}: metadata.tolerance must be a number >= 0")
        fmt = metadata.get("format")
        if fmt is not None:
            try:
                re.compile(fmt)
            except (re.error, TypeError) as e:
                raise RewardError(f"{where}: metadata.format is not a valid regex ({e})") from e
        return cls(str(answer), choices, None if tol is None else float(tol), fmt, where)


def answer_text(response: str) -> str:
    """The part of the response that holds the answer: after the last "Answer:", else all of it."""
    found = list(_ANSWER.finditer(response))
    return response[found[-1].end():] if found else response


def _normalise(text: str) -> str:
    text = " ".join(text.lower().split()).strip(_PUNCT + " ")
    text = re.sub(r"^(?:the|a|an)\s+", "", text)
    return " ".join(text.split())


def exact_match(response: str, target: RewardTarget) -> float:
    return float(_normalise(answer_text(response)) == _normalise(target.answer) != "")


def _target_letter(target: RewardTarget) -> str:
    letter = target.answer.strip().strip("()").upper()
    n = len(target.choices) if target.choices else 26
    if len(letter) != 1 or not "A" <= letter < chr(ord("A") + n):
        raise RewardError(f"{target.where}: multiple_choice needs metadata.answer to be one option letter "
                          f"A..{chr(ord('A') + n - 1)}, got {target.answer!r}")
    return letter


def multiple_choice(response: str, target: RewardTarget) -> float:
    want = _target_letter(target)
    n = len(target.choices) if target.choices else 26
    valid = "".join(chr(ord("A") + i) for i in range(n))
    text = answer_text(response)
    # A letter standing alone: "(B)", "B.", "B)", "B:", "option B", "B" -- not the "A" of "A red circle".
    # "A" / "I" before a lower-case word are the article / pronoun ("A red circle"), not options
    # ("A or B" names two options).
    named = {m.group(1) for m in re.finditer(rf"(?:^|[\s(\[])([{valid}])(?=$|[\s).\]:,])", text)
             if not (m.group(1) in "AI" and re.match(r"\s+(?!(?:or|and|nor)\b)[a-z]", text[m.end():]))}
    if not named and target.choices:  # the option's text instead of its letter
        norm = _normalise(text)
        named = {valid[i] for i, c in enumerate(target.choices) if _normalise(c) and _normalise(c) == norm}
    return float(named == {want})


def parse_number(text: str) -> Optional[float]:
    """The value of one number token as `_NUMBER` finds it (None when it is not one)."""
    t = text.strip().lower().replace("\u2212", "-").replace(",", "")
    if t in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[t])
    try:
        if "/" in t:
            num, den = (float(p) for p in t.replace(" ", "").split("/"))
            return num / den if den else None
        return float(t)
    except ValueError:
        return None


def numeric(response: str, target: RewardTarget, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> float:
    want = parse_number(target.answer)
    if want is None or not math.isfinite(want):
        raise RewardError(f"{target.where}: numeric needs metadata.answer to be a number, got {target.answer!r}")
    found = _NUMBER.findall(answer_text(response))
    if not found:
        return 0.0
    got = parse_number(found[-1])
    if got is None or not math.isfinite(got):
        return 0.0
    tol = max(target.tolerance if target.tolerance is not None else abs_tol, rel_tol * abs(want))
    return float(abs(got - want) <= tol)


def format_reward(response: str, target: RewardTarget) -> float:
    return float(re.fullmatch(target.format or DEFAULT_FORMAT, response.strip(), re.DOTALL) is not None)


RewardFn = Callable[[str, RewardTarget], float]
REWARDS: Dict[str, RewardFn] = {
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "numeric": numeric,
    "format": format_reward,
}


def check_reward_weights(weights: Mapping[str, float], where: str) -> None:
    """A source's ``rewards`` mapping: known names, weights >= 0, at least one > 0."""
    unknown = [k for k in weights if k not in REWARDS]
    if unknown:
        raise RewardError(f"{where}: unknown reward(s) {unknown}; choose from {', '.join(REWARDS)}")
    if not weights or not any(w > 0 for w in weights.values()) or any(w < 0 for w in weights.values()):
        raise RewardError(f"{where}: rewards need weights >= 0 with at least one > 0, got {dict(weights)}")


def combined_reward(response: str, target: RewardTarget, weights: Mapping[str, float]) -> float:
    """sum_k w_k * rule_k(response, target) over the source's rewards."""
    return float(sum(w * REWARDS[name](response, target) for name, w in weights.items() if w))


def rewards_for(responses: List[str], targets: List[RewardTarget], weights: List[Mapping[str, float]]) -> List[float]:
    if not len(responses) == len(targets) == len(weights):
        raise ValueError(f"{len(responses)} responses, {len(targets)} targets, {len(weights)} reward weights")
    return [combined_reward(r, t, w) for r, t, w in zip(responses, targets, weights)]
