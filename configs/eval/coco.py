"""COCO (or Flickr30k) retrieval and captioning: the `eval` section for
`python -m coca_jax.evaluate`.

    python -m coca_jax.evaluate --export=DIR --config=configs/eval/coco.py[:DATASETS] \
        [--config.eval.benchmarks.captioning=False]

DATASETS: coco (TFDS coco_captions, the Karpathy test split: 5,000 images, ~25,000
captions; the default) or flickr30k (own TFRecords of the test split,
--config.eval.benchmarks.flickr30k_files=PATTERN), or both. Image->text and text->image
Recall@1/5/10 over all captions; CIDEr-D and BLEU-4 of one caption per image
against all its captions (config.eval.decode chooses the decoding: beam 4 by default).
"""

from configs.eval import recipe


def get_config(arg=None):
  return recipe.benchmark_config(arg or "coco", ("coco", "flickr30k"))
