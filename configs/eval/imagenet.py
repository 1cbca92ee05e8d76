"""Zero-shot ImageNet: the `eval` section for `python -m coca_jax.evaluate`.

    python -m coca_jax.evaluate --export=DIR --config=configs/eval/imagenet.py[:DATASETS] \
        [--config.eval.benchmarks.tfds_data_dir=DIR] [--config.eval.benchmarks.templates=clip7]

DATASETS: imagenet2012 (validation, 50,000 images; the default), imagenet_v2 (test,
10,000), or both comma-separated. CLIP's 1,000 class names and 80 prompt templates
(coca_jax/data/benchmark_names/); top-1 / top-5 over the whole split. Pixels follow the
export's config.data.image (open_clip imports: bicubic resize, CLIP's mean / std).
"""

from configs.eval import recipe


def get_config(arg=None):
  return recipe.benchmark_config(arg or "imagenet2012", ("imagenet2012", "imagenet_v2"))
