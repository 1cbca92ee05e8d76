"""The `config.eval` section: which evaluations run during training and on exports.

Training runs `coca_jax.evaluate.run` every `config.train.eval_every` steps; the
`python -m coca_jax.evaluate --export=DIR` command runs the same suite on an export.
"""

import ml_collections

# Prompt ensemble for zero-shot classification (Section 4.2 of the paper uses CLIP's
# ensemble; these are its most generic members, neutral to the image domain).
TEMPLATES = (
  "a photo of a {}.",
  "a photo of the {}.",
  "a picture of a {}.",
  "an image of a {}.",
  "a close-up photo of a {}.",
  "a {}.",
)


def get_config() -> ml_collections.ConfigDict:
  """Defaults for the eval section; config files override leaves."""
  return ml_collections.ConfigDict(
    dict(
      # Comma-separated subset of: zero_shot, retrieval, captioning, frozen.
      evals="zero_shot,retrieval,captioning",
      batch_size=64,  # jitted eval batch; the last batch is padded to it
      num_examples=1_000,  # examples per eval split (0: the whole split)
      zero_shot=dict(templates=TEMPLATES, top_k=(1, 5)),
      retrieval=dict(recall_at=(1, 5, 10)),
      captioning=dict(
        gallery_size=32,  # images in <workdir>/eval/captions_<step>.html
      ),
      decode=dict(
        method="greedy",  # greedy | beam | sample
        max_length=0,  # 0: config.model.text.max_len
        beam_size=4,
        length_penalty=0.6,  # GNMT alpha
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
      ),
      # Frozen-feature evaluation (Section 4.2): a fresh attentional pooler and a
      # softmax classifier trained on frozen image-encoder tokens.
      frozen=dict(
        lr=5e-4,  # the paper's value, cosine schedule
        steps=300,
        batch_size=64,
        weight_decay=0.0,
        train_fraction=0.5,  # of the classification split, when it has no train part
        seed=0,
      ),
    )
  )
