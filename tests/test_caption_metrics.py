"""Caption metrics on cases with known values."""

import math

import pytest

from unified_seq.caption_metrics import caption_scores, tokenize


def test_tokenize_drops_punctuation_and_case():
    assert tokenize("A Red circle, and a  square!") == "a red circle and a square"


def test_exact_match_scores_one():
    refs = {1: ["a red circle above a blue square"], 2: ["two green triangles in the middle"]}
    preds = {1: "a red circle above a blue square", 2: "Two green triangles in the middle."}
    scores = caption_scores(refs, preds)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    # CIDEr-D: the two images share no word, so every n-gram has idf log 2;
    # a candidate equal to its only reference has cosine 1 and no length
    # penalty for n = 1..4, and the score is 10 × their mean.
    assert scores["CIDEr"] == pytest.approx(10.0, abs=1e-6)


def test_bleu4_matches_hand_computation():
    # Hypothesis of 6 words against one reference of 6 words sharing the first 5:
    # 1-grams 5/6, 2-grams 4/5, 3-grams 3/4, 4-grams 2/3, brevity penalty 1.
    refs = {1: ["the cat sat on the mat"]}
    preds = {1: "the cat sat on the rug"}
    expected = math.exp((math.log(5 / 6) + math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3)) / 4)
    assert caption_scores(refs, preds)["BLEU-4"] == pytest.approx(expected, rel=1e-6)


def test_cider_ranks_better_captions_higher():
    refs = {
        1: ["a red circle at the top", "one red circle near the top"],
        2: ["a person in the middle", "a person standing in the middle"],
        3: ["two blue squares at the bottom", "a pair of blue squares at the bottom"],
    }
    good = {
        1: "a red circle at the top",
        2: "a person in the middle",
        3: "two blue squares at the bottom",
    }
    bad = {1: "a person in the middle", 2: "two blue squares", 3: "a red circle"}
    assert caption_scores(refs, good)["CIDEr"] > caption_scores(refs, bad)["CIDEr"] + 1.0


def test_prediction_without_reference_is_an_error():
    with pytest.raises(ValueError, match="without reference"):
        caption_scores({1: ["a"]}, {2: "a"})
