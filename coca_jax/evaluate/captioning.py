"""Captioning metrics (CIDEr-D, BLEU-4) and an HTML gallery of generated captions.

Legend: N images, R references per image (may vary), H/W image size.

Scores come from pycocoevalcap 1.2's pure-Python scorers: `Cider` (which implements
CIDEr-D: clipped n-gram counts and a Gaussian length penalty, sigma 6) and `Bleu(4)`
("closest" reference length). The COCO toolkit's PTBTokenizer needs Java; `normalize`
replaces it with a regex tokenizer that gives the toolkit's tokens (Stanford PTBTokenizer
3.4.1, lower case, its punctuation tokens dropped) on all 3,786 distinct emoji captions
(training and validation) and on the cases in tests/test_evaluate.py, checked against
the toolkit's jar:
- words of any script, kept whole when joined by "-" or "/" ("t-shirt", "and/or"), by an
  apostrophe that starts no clitic ("o'clock"), by single underscores ("a_b"), by periods
  between letter-led pieces ("node.js", "horse.the") or by "&" between capitals ("AT&T",
  "Q&A"; "a&b" splits); numbers with their separators ("3.5", "1,000", "2:30"), a sign
  that starts one ("-1", "x +1"), a leading period (".5");
- n't and the clitics 's 'd 'm 'll 're 've split off ("does n't", "man 's"), "cannot"
  -> "can not" and PTB's other split words ("gonna" -> "gon na");
- dotted abbreviations ("e.u.", "p.m.", "ph.d."), a single letter's period ("plan b."),
  and PTB's abbreviations that were checked against the jar (titles "mr." "gen.", months
  "jan.", "inc.", "ave.", ...; "no." before a number) keep their dots;
- punctuation (. , : ; ? ! quotes and guillemets, dashes, runs of periods, "…") dropped;
  other symbols kept as tokens ("%", "&", "$", "#", "_", "**", "??", "!?", "✓"), with PTB's
  own spellings of brackets ("-lrb-", which the toolkit's upper-case punctuation list
  misses), the euro ("$") and the pound ("#"); characters outside Unicode's basic plane
  (emoji), which PTB deletes, dropped; so are invisible format characters (zero-width
  spaces and joiners, direction marks, the soft hyphen, which joins its word) and emoji
  variation selectors; HTML entities are decoded; text is compared in NFC (the jar echoes
  a decomposed accent as it came).
Not covered (each checked against the jar): e-mail addresses, URLs and "@user" / "#tag"
(split at their symbols), a leading apostrophe kept on a word ("'90s", "rock 'n' roll"),
emoticons (":-)" is ":--rrb-"), "C#" and "A++" ("c#", "a + +"), vulgar fractions ("½" is
"1/2"), feet and inches ("5'10\"" is "5 10"), "y'all" ("y' all"), a period joining a
number to letters ("3.5.x").
"""

import base64
import html
import io
import os
import re
import unicodedata
from typing import Sequence

import numpy as np

_APOSTROPHE = "['\u2019]"  # typographic apostrophes split off clitics as ASCII ones do
_SPLIT_WORDS = {
  "cannot": "can not",
  "gonna": "gon na",
  "gotta": "got ta",
  "wanna": "wan na",
  "lemme": "lem me",
  "gimme": "gim me",
}
_SPLIT_WORD = re.compile(r"\b(?:" + "|".join(_SPLIT_WORDS) + r")\b")
_ENDINGS = "s|d|m|ll|re|ve"  # PTB's clitics besides n't: 's 'd 'm 'll 're 've
_NEGATION = re.compile(r"(?<=[^\W_])n" + _APOSTROPHE + r"t\b")
_CLITIC = re.compile(r"(?<=[^\W_])" + _APOSTROPHE + rf"({_ENDINGS})\b")
_CLITICS = {"n't", *("'" + ending for ending in _ENDINGS.split("|"))}
# A word part: a number with its separators; letters and digits of any script, joined by
# single underscores ("a_b"), or by periods where each piece starts with a letter
# ("node.js", "horse.the"; "v1.2" splits as "v1 .2").
_LETTER_LED = r"[^\W\d_][^\W_]*"
_PART = rf"(?:\d+(?:[.,:]\d+)+|[^\W_]+(?:_[^\W_]+)+|{_LETTER_LED}(?:\.{_LETTER_LED})+|[^\W_]+)"
_SIGNED = r"[-+]\d+(?:[.,:]\d+)*"  # a sign that starts a number stays on it
# Abbreviations that PTB keeps with their dot (checked against the toolkit's jar; not
# "no.", which it keeps only before a number).
_ABBREVIATIONS = (
  "mrs? ms dr prof st jr sr vs etc cf al rev hon pres gen gov sen rep capt col lt sgt messrs "
  "jan feb mar apr jun jul aug sept? oct nov dec mt ave blvd rd ft sq inc co corp ltd bros "
  "dept univ est ph"
).split()
# "&" between capitals joins them ("AT&T", "Q&A"; "a&b" splits): marked before lower-casing.
_CAPITALS_AMPERSAND = re.compile(r"(?<=[A-Z])&(?=[A-Z])")
_JOINED_AMPERSAND = "\ue000"  # a private-use character, never in a caption
_TOKEN = re.compile(
  rf"(?<!\S)(?:n't|'(?:{_ENDINGS}))(?![^\W_])"  # a clitic split off above
  rf"|(?:{'|'.join(_ABBREVIATIONS)})\.(?!\w)"  # titles, months, ... with their dot
  r"|no\.(?=\s*\d)"  # "no. 5", "no.1"
  r"|(?:[^\W_]+\.)+[^\W\d_]\.(?![^\W_])"  # dotted abbreviations: e.u., p.m., ph.d.
  r"|(?<![^\W_])[^\W\d_]\.(?![^\W_])"  # a single letter's dot: "plan b.", "a."
  rf"|[^\W_]+(?:{_JOINED_AMPERSAND}[^\W_]+)+"  # at&t
  rf"|{_PART}(?:[-/]{_PART}|{_APOSTROPHE}[^\W_]+)*"  # t-shirt, and/or, o'clock, 3.5
  rf"|{_SIGNED}"  # -1, +3.5
  r"|\.\d+"  # .5
  r"|[?!]{2,}"  # ?!, !!?
  r"|_+"  # underscores apart from a word
  r"|([^\w\s])\1*"  # a run of one symbol: %, &, **, ...
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CURRENCIES = {"\u20ac": "$", "\u00a3": "#"}
# Quotes (guillemets too) and dashes, any run.
_DROPPED_FIRST = "'\"`\u2018\u2019\u201c\u201d\u00ab\u00bb-\u2013\u2014"
_DROPPED = {"\u2026", ",", ":", ";", "?", "!"}
# Variation selectors (U+FE0F makes "\u2764\ufe0f" an emoji) and the combining keycap.
_EMOJI_MARKS = {chr(c) for c in range(0xFE00, 0xFE10)} | {"\u20e3"}


def _token(token: str) -> str | None:
  """A matched token as the toolkit keeps it, or None where it drops it."""
  if token in _CLITICS:
    return token
  if token in _BRACKETS:
    return _BRACKETS[token]
  if re.fullmatch(_SIGNED, token):  # not a dash
    return token
  if token in _DROPPED or token[0] in _DROPPED_FIRST or ord(token[0]) > 0xFFFF:
    return None
  if set(token) == {"."}:  # any run of periods is PTB's "..." (or its ".")
    return None
  return _CURRENCIES.get(token, token)


def _visible(text: str) -> str:
  """text with HTML entities decoded ("&amp;" is "&", as the toolkit reads it), the soft
  hyphen deleted (it joins the word), other invisible format characters (zero-width
  spaces and joiners, direction marks, BOM) and emoji variation selectors and keycap
  marks as spaces (the toolkit drops them), then NFC: a combining accent stays on its
  letter."""
  text = html.unescape(text)
  text = "".join(
    "" if c == "\xad" else " " if unicodedata.category(c) == "Cf" or c in _EMOJI_MARKS else c
    for c in text
  )
  return unicodedata.normalize("NFC", text)


def normalize(text: str) -> str:
  """Lower-cased PTB tokens separated by single spaces, punctuation dropped (see above)."""
  text = _CAPITALS_AMPERSAND.sub(_JOINED_AMPERSAND, _visible(text))
  text = _SPLIT_WORD.sub(lambda m: _SPLIT_WORDS[m.group()], text.lower())
  text = _CLITIC.sub(r" '\1", _NEGATION.sub(" n't", text))
  tokens = (_token(m.group()) for m in _TOKEN.finditer(text))
  return " ".join(t for t in tokens if t).replace(_JOINED_AMPERSAND, "&")


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """predictions: N strings; references: N lists of strings -> {"cider", "bleu4"}.

  CIDEr-D is reported on pycocoevalcap's scale (x10, so ~1.0 for a good COCO model).
  """
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider

  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
  if not predictions:
    raise ValueError("no captions to score")
  results = {i: [normalize(p)] for i, p in enumerate(predictions)}
  truths = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
  for i, refs in truths.items():
    if not refs:
      raise ValueError(f"image {i} has no reference captions")
  cider, _ = Cider().compute_score(truths, results)
  bleu, _ = Bleu(4).compute_score(truths, results, verbose=0)
  return dict(cider=float(cider), bleu4=float(bleu[3]))


def to_uint8(image: np.ndarray) -> np.ndarray:
  """A preprocessed image [H, W, 3] float (any normalisation) -> [H, W, 3] uint8 for
  display, by min-max scaling (the eval sets hold only normalised pixels)."""
  image = np.asarray(image, np.float32)
  low, high = float(image.min()), float(image.max())
  scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
  return np.round(scaled * 255).astype(np.uint8)


def png_data_uri(image_uint8: np.ndarray) -> str:
  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(image_uint8).save(buffer, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_gallery(
  path: str,
  images: np.ndarray,
  predictions: Sequence[str],
  references: Sequence[Sequence[str]],
  *,
  title: str,
) -> str:
  """Writes an HTML page: each image inline (base64 PNG), its caption, its references.

  images: [N, H, W, 3] preprocessed floats or uint8. Returns the path written.
  """
  rows = []
  for image, prediction, refs in zip(images, predictions, references):
    pixels = image if image.dtype == np.uint8 else to_uint8(image)
    ref_items = "".join(f"<li>{html.escape(r)}</li>" for r in refs)
    rows.append(
      f'<tr><td><img src="{png_data_uri(pixels)}" width="128"'
      ' style="image-rendering:pixelated"></td>'
      f"<td><b>{html.escape(prediction)}</b></td><td><ul>{ref_items}</ul></td></tr>"
    )
  page = (
    f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
    f"<body><h1>{html.escape(title)}</h1><table border='1' cellpadding='4'>"
    "<tr><th>image</th><th>generated</th><th>references</th></tr>"
    + "".join(rows)
    + "</table></body></html>"
  )
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path
