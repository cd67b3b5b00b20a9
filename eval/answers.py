"""How a model's output becomes an answer, in one of two explicit modes (never a fallback).

logits  (default) the first generated token's logits decide: yes when
        logsumexp(logits[yes ids]) > logsumexp(logits[no ids]), else no, where the ids are
        the single-token spellings of "Yes"/"yes" (with and without a leading space) and
        likewise for "No"/"no". POPE's constrained-answer scoring: always yes or no, even
        for a random-weight model, and one decoder step per question.
text    greedy decoding of up to --max-new-tokens, then VQA normalisation (lower case, no
        punctuation or articles); an answer starting with the word yes / no is that word,
        anything else stays as the normalised text (and is wrong on yes/no questions).
        Needed for open-ended questions (GQA, TextVQA subsets).
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from eval.pope import NO, YES, normalize

LOGITS, TEXT = "logits", "text"
ANSWER_MODES = (LOGITS, TEXT)
YES_FORMS = ("Yes", "yes", " Yes", " yes")
NO_FORMS = ("No", "no", " No", " no")


class AnswerError(ValueError):
    """The answer mode cannot work with this tokenizer or data; the message names the fix."""


def single_token_ids(tokenizer: Tokenizer, forms: tuple[str, ...]) -> list[int]:
    """Ids of the spellings that the tokenizer encodes as exactly one token, deduplicated."""
    ids = []
    for form in forms:
        enc = tokenizer.encode(form, add_special_tokens=False).ids
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids


def yes_no_ids(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(yes ids, no ids) for logits scoring; an error if either spelling set is empty."""
    yes, no = single_token_ids(tokenizer, YES_FORMS), single_token_ids(tokenizer, NO_FORMS)
    if not yes or not no:
        raise AnswerError(
            "the tokenizer has no single-token spelling of yes/no "
            f"(yes ids {yes}, no ids {no}); use --answer text"
        )
    if set(yes) & set(no):
        raise AnswerError(f"yes and no share token ids {set(yes) & set(no)}; use --answer text")
    return yes, no


def _logsumexp(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def logit_answer(
    first_logits: np.ndarray, yes_ids: list[int], no_ids: list[int]
) -> tuple[str, float]:
    """(answer, margin) from (V,) first-token logits; margin = log P(yes) - log P(no) > 0 -> yes."""
    margin = _logsumexp(first_logits[yes_ids]) - _logsumexp(first_logits[no_ids])
    return (YES if margin > 0 else NO), margin


def text_answer(text: str) -> str:
    """The normalised answer: "yes" / "no" when the text starts with that word, else the text."""
    words = normalize(text).split()
    if words and words[0] in (YES, NO):
        return words[0]
    return " ".join(words)


def check_labels(labels: set[str], mode: str) -> None:
    """Logits scoring only answers yes/no: open-ended labels need the text mode."""
    if mode not in ANSWER_MODES:
        raise AnswerError(f"unknown answer mode {mode!r}; choose one of {', '.join(ANSWER_MODES)}")
    other = labels - {YES, NO}
    if mode == LOGITS and other:
        raise AnswerError(
            f"labels other than yes/no (e.g. {sorted(other)[:3]}) cannot be scored from yes/no "
            "logits; use --answer text"
        )
