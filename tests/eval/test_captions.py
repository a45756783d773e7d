"""Caption metrics: CIDEr-D against a hand computation, BLEU-4 sanity, the tokenizer, the coco-caption suite."""

import json
import math
import shutil

import pytest

from eval.scoring import captions as captions_module
from eval.scoring.captions import caption_scores, tokenize
from eval.suites import ScoreContext, get_suite

# Two images, two references each: small enough to compute CIDEr-D by hand.
REFERENCES = {"1": ["a cat", "a black cat"], "2": ["a dog", "a brown dog"]}
PREDICTIONS = {"1": "a cat", "2": "a dog runs"}


def hand_cider() -> tuple[float, float]:
    """CIDEr-D of PREDICTIONS, from the definition as pycocoevalcap implements it.

    idf(g) = log(#images) - log(max(1, df(g))), df = number of images whose references contain g.
    With 2 images: "a" is in both images' references -> idf 0; every other n-gram (including the
    hypothesis-only "runs", "dog runs", "a dog runs", whose df is clipped to 1) -> idf log 2 =: L.
    Vectors are tf * idf per n-gram order n = 1..4; the per-order score is the clipped cosine
    sum_g min(h_g, r_g) * r_g / (|h| |r|) (0 when the hypothesis has no n-gram of that order), times the
    length penalty exp(-delta^2 / (2 * 6^2)), delta = difference of the *bigram* counts (pycocoevalcap's
    "length"). Per reference: the mean over the 4 orders; per image: 10 * mean over its references.
    Every vector entry below is L, so L cancels.
    """
    penalty = math.exp(-1 / (2 * 6.0**2))  # |delta| = 1
    # image 1, hypothesis "a cat" (1 bigram): unigram vector {cat: L}, bigram {a cat: L}
    #   ref "a cat": identical -> unigram 1, bigram 1, trigram/4-gram 0; delta 0          -> (1 + 1) / 4
    #   ref "a black cat" (2 bigrams): unigrams {black: L, cat: L}: L*L / (L * L*sqrt2) = 1/sqrt2;
    #       bigrams {a black, black cat}: no overlap -> 0; delta -1                        -> penalty/sqrt2 / 4
    image_1 = 10 * ((1 + 1) / 4 + penalty / math.sqrt(2) / 4) / 2
    # image 2, hypothesis "a dog runs" (2 bigrams): unigrams {dog: L, runs: L}, bigrams {a dog: L,
    # dog runs: L}, trigram {a dog runs: L}
    #   ref "a dog" (1 bigram): unigram L*L / (L*sqrt2 * L) = 1/sqrt2; bigram "a dog": 1/sqrt2; delta 1
    #                                                                                      -> 2 penalty/sqrt2 / 4
    #   ref "a brown dog" (2 bigrams): unigrams {brown: L, dog: L}: L*L / (L*sqrt2 * L*sqrt2) = 1/2;
    #       bigrams {a brown, brown dog}: 0; trigram: 0; delta 0                           -> (1/2) / 4
    image_2 = 10 * (2 * penalty / math.sqrt(2) / 4 + 0.5 / 4) / 2
    return image_1, image_2


def test_cider_matches_the_hand_computation():
    scores = caption_scores(PREDICTIONS, REFERENCES, tokenizer="python", java_metrics=False)
    image_1, image_2 = hand_cider()
    assert scores["per_item_cider"]["1"] == pytest.approx(100 * image_1, rel=1e-9)
    assert scores["per_item_cider"]["2"] == pytest.approx(100 * image_2, rel=1e-9)
    assert scores["cider"] == pytest.approx(100 * (image_1 + image_2) / 2, rel=1e-9)
    assert scores["cider"] == pytest.approx(287.0038, abs=1e-3)  # the figure, for the record
    assert scores["tokenizer"] == "python"


def test_cider_tokenizes_case_and_punctuation_away():
    noisy_refs = {"1": ["A cat.", "A black cat!"], "2": ["A dog", "a brown dog ."]}
    noisy = caption_scores({"1": "A CAT.", "2": "A dog, runs"}, noisy_refs, tokenizer="python",
                           java_metrics=False)
    clean = caption_scores(PREDICTIONS, REFERENCES, tokenizer="python", java_metrics=False)
    assert noisy["cider"] == pytest.approx(clean["cider"], rel=1e-12)


def test_bleu4_sanity():
    refs = {"1": ["a man is riding a horse on the beach", "a person rides a horse"],
            "2": ["two dogs play with a red ball in the park", "dogs playing in a park"]}
    perfect = caption_scores({"1": refs["1"][0], "2": refs["2"][0]}, refs, tokenizer="python",
                             java_metrics=False)
    assert perfect["bleu4"] == pytest.approx(100.0, abs=1e-6)
    partial = caption_scores({"1": "a man is riding a horse", "2": "two dogs play in the park"}, refs,
                             tokenizer="python", java_metrics=False)
    disjoint = caption_scores({"1": "green bananas", "2": "an empty kitchen"}, refs, tokenizer="python",
                              java_metrics=False)
    assert disjoint["bleu4"] < 1e-3
    assert disjoint["bleu4"] < partial["bleu4"] < perfect["bleu4"]
    assert 0 <= disjoint["cider"] < partial["cider"] < perfect["cider"]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A dog's ball, on the grass.", "a dog 's ball on the grass"),
        ("It can't be...", "it ca n't be"),
        ('A black-and-white photo of 3.5 "nice" cats!', "a black-and-white photo of 3.5 nice cats"),
        ("Two people're walking -- fast; really?", "two people 're walking fast really"),
        ("A cat (red)", "a cat -lrb- red -rrb-"),  # as PTBTokenizer -lowerCase leaves brackets
        ("Mr. Smith's 12 ft. boat", "mr. smith 's 12 ft. boat"),
        ("\u201cQuoted\u201d it\u2019s here\n", "quoted it 's here"),
        ("", ""),
    ],
)
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


@pytest.mark.skipif(shutil.which("java") is None, reason="needs Java for pycocoevalcap's PTBTokenizer")
def test_python_tokenizer_agrees_with_ptbtokenizer():
    captions = ["A man riding a wave on top of a surfboard.", "The man's hat is blue, isn't it?",
                "A kitchen with stainless steel appliances and granite counter tops .", "Two dogs -- one black!",
                'A sign that says "STOP".', "Mr. Smith's car (red) at St. Louis, U.S.A.", "I cannot see 3.5 cats"]
    ptb = captions_module._ptb_tokenize({str(k): [c] for k, c in enumerate(captions)})
    assert [tokenize(c) for c in captions] == [ptb[str(k)][0] for k in range(len(captions))]


def test_notes_without_java(monkeypatch):
    monkeypatch.setattr(captions_module.shutil, "which", lambda name: None)
    scores = caption_scores(PREDICTIONS, REFERENCES)
    assert scores["tokenizer"] == "python"
    assert any("Java not found" in note for note in scores["notes"])
    assert any("METEOR and SPICE skipped" in note for note in scores["notes"])
    assert "meteor" not in scores and "spice" not in scores
    with pytest.raises(RuntimeError, match="needs Java"):
        caption_scores(PREDICTIONS, REFERENCES, tokenizer="ptb")


def test_missing_predictions_score_zero_and_bad_input_is_refused():
    scores = caption_scores({"1": "a cat"}, REFERENCES, tokenizer="python", java_metrics=False)
    assert scores["per_item_cider"]["2"] == 0.0
    assert any("no prediction" in note for note in scores["notes"])
    with pytest.raises(ValueError, match="no references"):
        caption_scores({"1": "a cat"}, {}, tokenizer="python")
    with pytest.raises(ValueError, match="no reference caption"):
        caption_scores({"1": "a cat"}, {"1": []}, tokenizer="python")


def test_coco_caption_suite_reads_the_official_format(tmp_path, monkeypatch):
    monkeypatch.setattr(captions_module.shutil, "which", lambda name: None)  # same figures with or without Java
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2014").mkdir()
    for name in ("COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"):
        (tmp_path / "val2014" / name).write_bytes(b"not opened by load_items")
    content = {
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"},
                   {"id": 2, "file_name": "COCO_val2014_000000000002.jpg"},
                   {"id": 3, "file_name": "COCO_val2014_000000000003.jpg"}],  # no caption: no item
        "annotations": [{"id": 10, "image_id": 1, "caption": "A cat."},
                        {"id": 11, "image_id": 2, "caption": "A dog"},
                        {"id": 12, "image_id": 1, "caption": "A black cat"},
                        {"id": 13, "image_id": 2, "caption": "A brown dog."}],
    }
    (tmp_path / "annotations" / "captions_val2014.json").write_text(json.dumps(content))

    suite = get_suite("coco-caption")
    assert (suite.kind, suite.max_new_tokens, suite.primary_metric) == ("answer", 64, "cider")
    items = suite.load_items(str(tmp_path))
    assert [item.id for item in items] == ["1", "2"]
    assert items[0].prompt == "Describe the image."
    assert items[0].image == str(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    assert items[0].meta["references"] == ["A cat.", "A black cat"]
    assert [item.id for item in suite.load_items(str(tmp_path), limit=1)] == ["1"]

    predictions = {"1": {"id": "1", "answer": "A cat."}, "2": {"id": "2", "answer": "a dog runs"}}
    result = suite.score(predictions, items, ScoreContext())
    image_1, image_2 = hand_cider()
    assert result["metrics"]["cider"] == pytest.approx(100 * (image_1 + image_2) / 2, rel=1e-9)
    assert set(result["metrics"]) == {"cider", "bleu4"}
    assert result["count"] == 2
    assert any("Java not found" in note for note in result["notes"])
