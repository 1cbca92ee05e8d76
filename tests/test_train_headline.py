"""config.eval.headline / at_start: the trainer's final JSON names (hand-made cases)."""

import pytest
from tiny_runs import tiny_config

from coca_jax import train


def _config(headline, at_start=False, eval_every=5):
  c = tiny_config(5)
  c.eval.headline = headline
  c.eval.at_start = at_start
  c.train.eval_every = eval_every
  return c


def test_headline_names_final_metrics():
  c = _config(
    {"task/cider": "eval/captioning/cider", "task/before": "eval_at_start/captioning/cider"}, True
  )
  final = {"loss": 1.0, "eval/captioning/cider": 0.3, "eval_at_start/captioning/cider": 0.2}
  assert train.headline(c, final) == {**final, "task/cider": 0.3, "task/before": 0.2}


def test_a_resumed_run_omits_what_it_did_not_measure_at_start():
  c = _config({"task/before": "eval_at_start/captioning/cider"}, True)
  assert train.headline(c, {"loss": 1.0}) == {"loss": 1.0}


def test_unknown_metric_is_an_error_naming_the_key():
  c = _config({"task/cider": "eval/captioning/cidr"})
  with pytest.raises(ValueError, match=r"headline\['task/cider'\]='eval/captioning/cidr'"):
    train.headline(c, {"eval/captioning/cider": 0.3})


def test_early_checks():
  with pytest.raises(ValueError, match="needs config.eval.at_start=True"):
    train.check_headline(_config({"x": "eval_at_start/vqa/accuracy"}))
  with pytest.raises(ValueError, match="no periodic evaluation runs"):
    train.check_headline(_config({"x": "eval/vqa/accuracy"}, eval_every=0))
  # at_start evaluates before training, never after: "eval/..." would be missing at the end
  with pytest.raises(ValueError, match=r"'eval/loss': no periodic evaluation runs"):
    train.check_headline(_config({"x": "eval/loss"}, at_start=True, eval_every=0))
  c = _config({"x": "eval_at_start/loss"}, at_start=True)
  c.train.eval_steps = 0
  with pytest.raises(ValueError, match=r"no held-out loss is measured \(config.train.eval_steps=0"):
    train.check_headline(c)
  with pytest.raises(ValueError, match="eval 'vqa' is not among the evals the run runs"):
    train.check_headline(_config({"x": "eval/vqa/accuracy"}))  # config.eval.evals=""
  c = _config({"x": "eval/vqa/accuracy", "y": "loss", "z": "eval/loss"})
  c.eval.evals = "vqa"
  train.check_headline(c)


def test_a_held_out_top_k_that_is_never_reported_is_an_early_error():
  """With k or fewer held-out classes, held_out/top<k> is always 1 and not reported: the
  run failed at its very end, after training and the export, for want of the metric."""
  c = _config({"truly_zero_shot": "eval/zero_shot/held_out/top1"})
  c.eval.evals = "zero_shot"
  c.data.jft_style.held_out_classes = ("bag",)
  with pytest.raises(ValueError, match=r"held_out_classes=\('bag',\) holds 1 classes"):
    train.check_headline(c)
  c.data.jft_style.held_out_classes = ()
  with pytest.raises(ValueError, match="holds 0 classes"):
    train.check_headline(c)
  c.data.jft_style.held_out_classes = ("bag", "sneaker")
  train.check_headline(c)
  c.eval.headline = {"x": "eval/zero_shot/held_out/top5"}
  with pytest.raises(ValueError, match="top-5 among them is always 1"):
    train.check_headline(c)


def test_a_resume_that_changes_the_data_stream_is_named(caplog):
  c = _config({})
  stored = dict(step=30, seed=0, source="synthetic", global_batch_size=8, data_shards=2)
  with caplog.at_level("WARNING"):
    train.check_data_position(c, 2, stored)
    train.check_data_position(c, 2, dict(step=30, seed=0))  # written before the fields
  assert not caplog.records
  c.data.global_batch_size = 16
  with caplog.at_level("WARNING"):
    train.check_data_position(c, 4, stored)
  assert "global_batch_size 8 -> 16, data_shards 2 -> 4" in caplog.text
  assert "step 30" in caplog.text
  caplog.clear()
  c.data.global_batch_size = 8
  c.data.source = "mixture"
  stored = train.data_position(c, 2, 30)
  c.data.rates = {"jft_style": 0.25, "alt_text": 0.75}  # the sources' rows to skip change
  with caplog.at_level("WARNING"):
    train.check_data_position(c, 2, stored)
  rates = "rates {'alt_text': 0.5, 'jft_style': 0.5} -> {'alt_text': 0.75, 'jft_style': 0.25}"
  assert rates in caplog.text


def test_a_finished_run_started_again_skips_training_metrics_only():
  c = _config({"train/loss": "loss", "final/loss": "eval/loss"})
  assert train.headline(c, {"step": 5, "eval/loss": 2.0}, trained=False) == {
    "step": 5,
    "eval/loss": 2.0,
    "final/loss": 2.0,
  }
  with pytest.raises(ValueError, match="final/loss"):  # trained: a missing name is an error
    train.headline(c, {"step": 5, "loss": 1.0, "eval/los": 2.0})
