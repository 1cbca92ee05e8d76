"""Zero-shot CIFAR: the `eval` section for `python -m coca_jax.evaluate`.

    python -m coca_jax.evaluate --export=DIR --config=configs/eval/cifar.py[:DATASETS]

DATASETS: cifar10 (the default), cifar100, or both comma-separated; the test split
(10,000 images each) with CLIP's class names and its 18 CIFAR prompt templates
(coca_jax/data/benchmark_names/); top-1 / top-5.
"""

from configs.eval import recipe


def get_config(arg=None):
  return recipe.benchmark_config(arg or "cifar10", ("cifar10", "cifar100"))
