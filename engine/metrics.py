"""Scores for generated summaries: ROUGE (via `rouge-score`), length, abbreviation expansion."""

from __future__ import annotations

import re
from collections.abc import Sequence

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Sentence ends: . ! ? followed by space and a capital/digit/bracket. Abbreviations with a dot
# inside ("e.g. the") stay together because a lowercase word follows.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])")


def split_sentences(text: str) -> str:
    """One sentence per line, which is how rougeLsum expects summaries."""
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F1 of ROUGE-1/2/L/Lsum (Porter stemming on), as percentages like Transformers' examples."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for kind in ROUGE_TYPES:
            totals[kind] += scores[kind].fmeasure
    n = max(len(predictions), 1)
    return {kind: 100 * total / n for kind, total in totals.items()}


def expansion_accuracy(predictions: Sequence[str], expansions: Sequence[dict | None]) -> tuple[float | None, int]:
    """Share of expected "expansion (ABBR)" strings found in the predictions (case-insensitive).

    Only records that carry an `expansions` mapping count; returns (accuracy or None, how many
    expansions were expected).
    """
    expected = found = 0
    for prediction, mapping in zip(predictions, expansions, strict=True):
        if not mapping:
            continue
        text = " ".join(prediction.lower().split())
        for abbreviation, expansion in mapping.items():
            expected += 1
            found += f"{' '.join(expansion.lower().split())} ({abbreviation.lower()})" in text
    return (found / expected if expected else None), expected
