"""ROUGE as rouge-score computes it, sentence splitting for Lsum, abbreviation-expansion accuracy."""

import pytest
from rouge_score import rouge_scorer

from engine.metrics import expansion_accuracy, rouge, split_sentences


def test_split_sentences_puts_one_sentence_per_line_and_keeps_decimal_points():
    text = "Pt is a 71 yo F. BP 120/80, temp 38.5 C. Started ASA 81 mg! Follow-up: ECG."
    assert split_sentences(text).split("\n") == ["Pt is a 71 yo F.", "BP 120/80, temp 38.5 C.",
                                                 "Started ASA 81 mg!", "Follow-up: ECG."]


def test_rouge_equals_rouge_score_f1_with_stemming_averaged_over_records():
    predictions = ["The patient was treated with aspirin. Follow-up in one week.", "no overlap here"]
    references = ["Patient treated with aspirins. Follow-up: ECG in 1 week.", "something else entirely"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    for p, r in zip(predictions, references):
        scores = scorer.score(split_sentences(r), split_sentences(p))
        for k in expected:
            expected[k] += 100 * scores[k].fmeasure / 2
    assert rouge(predictions, references) == pytest.approx(expected)
    assert rouge(["aspirins given"], ["aspirin given"])["rouge1"] == pytest.approx(100.0)  # stemming on
    # Lsum scores sentence by sentence: reordering sentences hurts L but not Lsum.
    swapped = rouge(["Bee cee dee. Ay ex why."], ["Ay ex why. Bee cee dee."])
    assert swapped["rougeLsum"] == pytest.approx(100.0) and swapped["rougeL"] < 100.0


def test_expansion_accuracy_counts_expected_expansions_found_and_skips_records_without_them():
    predictions = ["Shortness of breath (SOB) and  blood pressure (BP) high.", "anything", "chest pain (CP)"]
    expansions = [{"SOB": "shortness of breath", "BP": "blood pressure", "DM": "diabetes mellitus"}, None,
                  {"CP": "chest pain"}]
    accuracy, expected = expansion_accuracy(predictions, expansions)
    assert expected == 4 and accuracy == pytest.approx(3 / 4)
    assert expansion_accuracy(["x"], [None]) == (None, 0)
    # The abbreviation must be given with the expansion, not just the words.
    assert expansion_accuracy(["shortness of breath"], [{"SOB": "shortness of breath"}])[0] == 0.0
