"""Caption metrics with pycocoevalcap's scorers: CIDEr-D and BLEU-4 always, METEOR and SPICE with Java.

    caption_scores({"391895": "a man riding a bike"}, {"391895": ["A man rides a bicycle.", ...]})
    -> {"cider": 110.5, "bleu4": 35.2, "per_item_cider": {"391895": 98.1}, "tokenizer": "python",
        "notes": [...]}

Conventions:
    * CIDEr is pycocoevalcap's `Cider` (CIDEr-D: n = 1..4, Gaussian length penalty sigma = 6, clipped
      tf-idf, IDF from the references of the images scored) and BLEU-4 is `Bleu(4)` (option "closest"),
      both reported as the raw pycocoevalcap value x 100, as papers do (CIDEr 110.5, BLEU-4 35.2).
      METEOR and SPICE, when computed, are x 100 as well.
    * The COCO pipeline tokenizes captions with Stanford CoreNLP's PTBTokenizer (Java) and drops its
      punctuation tokens. When `java` is on PATH that is what runs; otherwise `tokenize` below, a
      pure-Python PTB-style tokenizer (lowercase, contractions split as PTB does, the same punctuation set
      removed), stands in and a note says so. The two agree on ordinary captions; they can differ on rare
      constructs (e.g. slashes, abbreviations with periods), so scores computed without Java are close to,
      not guaranteed identical with, the official ones.
    * METEOR and SPICE run only with Java (their scorers are jar files); SPICE additionally needs the
      Stanford CoreNLP 3.6.0 jar in pycocoevalcap/spice/lib, which pycocoevalcap would otherwise try to
      download, so it is skipped (with a note) when that jar is absent.
    * CIDEr's IDF is computed over the scored images, so a corpus of one image scores 0 whatever the
      caption (every n-gram has document frequency = corpus size): score whole splits, not single images.
"""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

# pycocoevalcap/tokenizer/ptbtokenizer.py, PUNCTUATIONS: the tokens dropped after PTB tokenization.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'", "\u00b4": "'"})
# PTBTokenizer turns brackets into -LRB- -RRB- -LSB- -RSB- -LCB- -RCB-, and `-lowerCase` lowercases them
# too, so the uppercase entries of PUNCTUATIONS never match: "(red)" stays "-lrb- red -rrb-" in the
# official pipeline. Reproduced here so that scores agree.
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_CHARS = str.maketrans(_BRACKETS)
_NEGATION = re.compile(r"(\w)n't\b")
_CONTRACTION = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
                "gimme": "gim me", "lemme": "lem me"}
_SPLIT_WORD = re.compile(r"\b(" + "|".join(_SPLIT_WORDS) + r")\b")
# Abbreviations whose period PTB keeps ("mr. smith", "a 12 ft. boat"); "no." only before a number.
_ABBREVIATIONS = ("mrs|mr|ms|dr|prof|st|ave|mt|ft|jr|sr|vs|etc|inc|co|corp|ltd|gen|gov|sen|rep|lt|col|sgt|"
                  "capt|dept|est|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec")
_TOKEN = re.compile(
    r"-[lr][rsc]b-"  # brackets, as PTB writes them
    r"|n't\b"  # negation split off by _NEGATION
    r"|'(?:s|re|ve|ll|d|m)\b"  # contractions split off by _CONTRACTION
    r"|'\d\ds\b"  # '90s
    r"|(?:[^\W\d_]\.){2,}"  # u.s.a., e.g.
    r"|(?<![\w.])(?:" + _ABBREVIATIONS + r")\.(?=\s|$)"
    r"|(?<![\w.])no\.(?=\s*\d)"
    r"|\d+(?:[.,:]\d+)+(?:-\w+)*"  # 3.5, 1,000-piece, 10:30
    r"|\w+(?:[-'/.]\w+)*"  # words, black-and-white, o'clock, and/or, www.site.com
    r"|[?!]{2,}"  # "??", "?!": one token, which PTB keeps
    r"|\.{2,}|-{2,}"
    r"|[^\w\s]"  # any other symbol on its own
)


def _dropped(token: str) -> bool:
    return token in PUNCTUATIONS or set(token) <= {"."} or set(token) <= {"-"}


def tokenize(text: str) -> str:
    """A caption -> its lowercased PTB-style tokens without punctuation, joined by single spaces.

    Pure-Python stand-in for pycocoevalcap's PTBTokenizer (`-preserveLines -lowerCase`, then the tokens
    in `PUNCTUATIONS` removed): "A dog's ball, on the grass." -> "a dog 's ball on the grass";
    "It can't" -> "it ca n't"; "(red)" -> "-lrb- red -rrb-" (as the official pipeline leaves it, since
    PUNCTUATIONS lists the bracket tokens in upper case).
    """
    text = unicodedata.normalize("NFC", str(text)).translate(_QUOTES).lower().replace("\n", " ")
    text = text.replace('"', " ").translate(_BRACKET_CHARS)
    text = _SPLIT_WORD.sub(lambda match: _SPLIT_WORDS[match.group(1)], text)
    text = _NEGATION.sub(r"\1 n't", text)
    text = _CONTRACTION.sub(r"\1 '\2", text)
    return " ".join(token for token in _TOKEN.findall(text) if not _dropped(token))


def _ptb_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer (Java); raises if its output does not line up with the input."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # An empty line would shift PTBTokenizer's line-per-caption output: give it a placeholder token
    # that PTB removes anyway (a lone period).
    request = {key: [{"caption": caption if caption.strip() else "."} for caption in values]
               for key, values in captions.items()}
    result = PTBTokenizer().tokenize(request)
    if any(len(result.get(key, [])) != len(values) for key, values in captions.items()):
        raise RuntimeError("PTBTokenizer's output does not line up with its input")
    return {key: list(result[key]) for key in captions}


def _python_tokenize(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {key: [tokenize(caption) for caption in values] for key, values in captions.items()}


def _spice_jar_present() -> bool:
    import pycocoevalcap.spice.get_stanford_models as models

    return os.path.exists(os.path.join(models.SPICEDIR, models.SPICELIB, f"{models.JAR}.jar"))


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                   tokenizer: str = "auto", java_metrics: bool = True) -> dict[str, Any]:
    """Score captions against references with pycocoevalcap.

    predictions: {id: caption}; references: {id: [reference captions]}. The ids scored are those of
    `references`; an id without a prediction is scored as the empty caption (0) and counted in the notes,
    predictions for ids without references are ignored (also noted).
    tokenizer: "auto" (PTBTokenizer when `java` is on PATH, else the pure-Python `tokenize`), "ptb" or
    "python". java_metrics: compute METEOR and SPICE when Java (and SPICE's models) are present.

    Returns {"cider": float, "bleu4": float, ["meteor": float], ["spice": float],
    "per_item_cider": {id: float}, "tokenizer": "ptb" | "python", "notes": [str]}: every score is the
    pycocoevalcap value x 100.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as error:
        raise ImportError("caption metrics need pycocoevalcap: pip install 'mllm[eval]' "
                          "(or pip install pycocoevalcap)") from error
    if tokenizer not in ("auto", "ptb", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'python', not {tokenizer!r}")
    if not references:
        raise ValueError("no references to score against: pass {id: [reference captions]} with at least one id")
    notes: list[str] = []
    refs: dict[str, list[str]] = {}
    for key, values in references.items():
        if isinstance(values, str):
            values = [values]
        values = [str(value) for value in values]
        if not values:
            raise ValueError(f"image {key!r} has no reference caption; every scored id needs at least one")
        refs[str(key)] = values
    preds = {str(key): ("" if value is None else str(value)) for key, value in predictions.items()}
    missing = [key for key in refs if key not in preds]
    if missing:
        notes.append(f"{len(missing)} of {len(refs)} images have no prediction; scored as empty captions "
                     f"(e.g. {missing[0]!r})")
    extra = [key for key in preds if key not in refs]
    if extra:
        notes.append(f"{len(extra)} predictions have no references and were ignored (e.g. {extra[0]!r})")
    hyps = {key: [preds.get(key, "")] for key in refs}

    java = shutil.which("java")
    used = "python"
    if tokenizer == "ptb" or (tokenizer == "auto" and java):
        if not java:
            raise RuntimeError("tokenizer='ptb' needs Java (PTBTokenizer is Stanford CoreNLP): install a JRE "
                               "or use tokenizer='python'")
        try:
            gts, res = _ptb_tokenize(refs), _ptb_tokenize(hyps)
            used = "ptb"
            notes.append("tokenized with pycocoevalcap's PTBTokenizer (Stanford CoreNLP, Java)")
        except Exception as error:  # fall back to the Python tokenizer, and say so
            if tokenizer == "ptb":
                raise
            notes.append(f"PTBTokenizer failed ({error}); tokenized with the pure-Python PTB-style tokenizer")
    if used == "python":
        gts, res = _python_tokenize(refs), _python_tokenize(hyps)
        if tokenizer == "auto" and not java:
            notes.append("Java not found: tokenized with the pure-Python PTB-style tokenizer (lowercase, "
                         "PTBTokenizer's punctuation removed) instead of PTBTokenizer; scores may differ "
                         "slightly from the official pipeline")
        elif tokenizer == "python":
            notes.append("tokenized with the pure-Python PTB-style tokenizer (tokenizer='python')")
    if not any(ref.split() for values in gts.values() for ref in values):
        raise ValueError("the references contain no words after tokenization: check the annotations file")

    cider, per_item = Cider().compute_score(gts, res)
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict[str, Any] = {
        "cider": float(cider) * 100.0,
        "bleu4": float(bleus[3]) * 100.0,
        "per_item_cider": {key: float(value) * 100.0 for key, value in zip(gts, per_item)},
        "tokenizer": used,
        "notes": notes,
    }
    if len(gts) == 1:
        notes.append("CIDEr over a single image is always 0 (its IDF is computed over the scored images)")

    if not java_metrics:
        notes.append("METEOR and SPICE not computed (java_metrics=False)")
    elif not java:
        notes.append("METEOR and SPICE skipped: they run Java jars and `java` is not on PATH (install a "
                     "JRE to compute them)")
    else:
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            out["meteor"] = float(Meteor().compute_score(gts, res)[0]) * 100.0
        except Exception as error:  # noqa: BLE001 - an optional metric must not sink the others
            notes.append(f"METEOR failed: {error}")
        if not _spice_jar_present():
            notes.append("SPICE skipped: pycocoevalcap/spice/lib lacks stanford-corenlp-3.6.0.jar (run "
                         "python -m pycocoevalcap.spice.get_stanford_models once, with network access)")
        else:
            try:
                from pycocoevalcap.spice.spice import Spice

                out["spice"] = float(Spice().compute_score(gts, res)[0]) * 100.0
            except Exception as error:  # noqa: BLE001
                notes.append(f"SPICE failed: {error}")
    return out


__all__ = ["PUNCTUATIONS", "caption_scores", "tokenize"]
