"""Captioning metrics (CIDEr-D, BLEU-4) and an HTML gallery of generated captions.

Legend: N images, R references per image (may vary), H/W image size.

Scores come from pycocoevalcap 1.2's pure-Python scorers: `Cider` (which implements
CIDEr-D: clipped n-gram counts and a Gaussian length penalty, sigma 6) and `Bleu(4)`
("closest" reference length). The COCO toolkit's PTBTokenizer needs Java; `normalize`
replaces it with a regex tokenizer that follows it on plain alt-text: lower case, words
of any script, hyphenated words kept whole ("t-shirt"), clitics split off ("man 's"),
punctuation dropped (the toolkit drops PTB's punctuation tokens). Not Java's tokenizer
in every corner ("don't" stays "don 't" where PTB gives "do n't").
"""

import base64
import html
import io
import os
import re
from typing import Sequence

import numpy as np

# A word: letters or digits of any script ([^\W_]), hyphen-joined parts kept together; or a
# clitic ("'s") split off the word it follows, as PTB does (a quote before a word is not one).
_WORD = re.compile(r"[^\W_]+(?:-[^\W_]+)*|(?<=[^\W_])'[^\W_]+")


# Typographic apostrophes (right and left single quotation marks) read as ASCII ones, as
# PTB's tokenizer reads them: "man’s shoe" -> "man 's shoe", not "man s shoe".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})


def normalize(text: str) -> str:
  """Lower-cased words separated by single spaces, punctuation dropped (see above)."""
  return " ".join(_WORD.findall(text.lower().translate(_APOSTROPHES)))


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
