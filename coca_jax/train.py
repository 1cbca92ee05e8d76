"""Trains CoCa: config -> mesh -> data -> state (restore or init) -> loop -> export.

    python -m coca_jax.train --config=configs/demo.py --workdir=/tmp/coca_demo
    python -m coca_jax.train --config=configs/base.py --workdir=gs://bucket/run1 \\
        --config.optim.lr=5e-4 --config.data.global_batch_size=4096

Workdir layout: config.json, checkpoints/<step>/, TensorBoard events, eval/, export/.
A restart with the same workdir resumes from the latest complete checkpoint. SIGTERM
(TPU VM preemption) saves a checkpoint at the next step boundary and exits 0; in one
process it also cuts a periodic evaluation short.

Settings that would fail late (at the first eval, at the export) are checked before
anything is built or written (`check_config`); config.json is written only once the
state is restored or initialised, so a failing invocation leaves the run's record (which
export, load and evaluate rebuild the model from) as it was. An export directory is
refused as the workdir.
"""

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from etils import epath
from flax import traverse_util
from ml_collections import config_flags

from coca_jax import (
  checkpoint,
  console,
  decode,
  export,
  flops,
  host_memory,
  init_from,
  multihost,
  optim,
  sharding,
)
from coca_jax import config as config_lib
from coca_jax import params as params_lib
from coca_jax import state as state_lib
from coca_jax import step as step_lib
from coca_jax.data import loader, vocab


def define_flags() -> None:
  """The command line; defined only when run as a program, so that importing this module
  (tests, other entry points) registers no absl flags."""
  config_lib.configs_importable()
  config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:switches]).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs, export.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


class Preempted(BaseException):
  """SIGTERM during an `interruptible` block. A BaseException, as KeyboardInterrupt is, so
  that no `except Exception` on the way (an evaluator's) takes it for an error."""


class Preemption:
  """SIGTERM -> checkpoint and stop at the next step boundary, at the same step on every
  host.

  One process: our own SIGTERM handler sets a flag, and inside `interruptible()` (the
  periodic evaluation, which can outlast a preemption's grace period) raises
  Preempted at once. Ctrl-C (SIGINT) does the same; a second one stops at once, without a
  checkpoint. (A KeyboardInterrupt raised inside Orbax's wait for the previous save had
  left that save uncommitted, and the next start deleted it.)

  Several processes: JAX's coordination service registers its own SIGTERM handler at
  jax.distributed.initialize and agrees on a step every host reaches
  (`reached_preemption`); installing ours would replace it, and each host would then
  stop at its own step and hang in the collective save. There an evaluation runs to its
  end before the step is agreed: JAX tells a process of the signal only at a sync point.
  Ctrl-C stays Python's there.
  """

  def __init__(self):
    self.requested = False
    self._interruptible = False
    self._sigint = None
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def catch_sigint(self):
    """Ctrl-C checkpoints from here on, as SIGTERM does (one process). Before, during the
    setup and compilation, it stops the run at once: there is nothing to save."""
    if jax.process_count() == 1:
      self._sigint = signal.signal(signal.SIGINT, self._handle)

  def close(self):
    """Ctrl-C raises KeyboardInterrupt again (the final evaluation and export, and the
    caller of train.train, e.g. a notebook); SIGTERM keeps our handler to the end."""
    if self._sigint is not None:
      signal.signal(signal.SIGINT, self._sigint)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    self.requested = True
    if self._interruptible:
      self._interruptible = False  # once: a second signal must not break the save
      logging.warning("%s received: leaving the evaluation to checkpoint", name)
      raise Preempted
    again = " (Ctrl-C again: stop now, without one)" if signum == signal.SIGINT else ""
    logging.warning("%s received: checkpointing at the next step boundary%s", name, again)

  @contextlib.contextmanager
  def interruptible(self):
    """A SIGTERM inside the block raises Preempted there, and one received since the
    step's check raises it on entry (one process; several: no-op)."""
    self._interruptible = True
    try:
      if self.requested:
        raise Preempted
      yield
    finally:
      self._interruptible = False

  def reached(self, mngr, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return mngr.reached_preemption(step)


# Prefix of the metrics measured before the first step (config.eval.at_start).
AT_START = "eval_at_start"


def evaluate_state(
  config, state, run, eval_step, vocabulary, *, step: int, workdir: str, writer
) -> dict:
  """Held-out losses, then the eval suite of config.eval (zero-shot, retrieval, ...).

  vocabulary: the SentencePiece processor of config.data.vocab_path (read once per run).
  """
  totals, count = {}, 0
  for batch in loader.batches(config, run.mesh, "eval", limit=config.train.eval_steps):
    terms = jax.device_get(eval_step(state, batch))
    totals = {k: totals.get(k, 0.0) + float(v) for k, v in terms.items()}
    count += 1
  metrics = {f"eval/{k}": v / count for k, v in totals.items()} if count else {}
  writer.write_scalars(step, metrics)
  if config.eval.evals:
    from coca_jax import evaluate, predict

    model = state_lib.model_from_params(run.layout.graphdef, state["params"])
    predictor = predict.Predictor(model, config, vocabulary, config.eval.batch_size, mesh=run.mesh)
    with jax.set_mesh(run.mesh):
      suite = evaluate.run(
        predictor,
        config,
        step=step,
        workdir=workdir if jax.process_index() == 0 else None,
        writer=writer,
      )
    metrics.update({f"eval/{k}": v for k, v in suite.items()})
  logging.info(
    "eval at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
  )
  return metrics


def log_memory(compiled) -> None:
  memory = compiled.memory_analysis()
  if memory is None:
    return
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  logging.info(
    "per-device memory of the train step: %s",
    ", ".join(
      f"{f.replace('_size_in_bytes', '')} {getattr(memory, f, 0) / 2**20:.1f} MiB" for f in fields
    ),
  )


class Throughput:
  """examples/s, steps/s, MFU and ETA between two log points."""

  def __init__(self, config, start_step: int):
    self.examples_per_step = config.data.global_batch_size
    self.flops_per_step = flops.train_flops_per_example(config) * self.examples_per_step
    peak = flops.peak_flops_per_device(
      jax.devices()[0], config.model.dtype, config.train.peak_flops
    )
    self.peak_total = None if peak is None else peak * jax.device_count()
    self.total_steps = config.train.steps
    self.restart(start_step)

  def restart(self, step: int) -> None:
    """Times from now and `step` on: what ran since (an evaluation) is not training."""
    self.last_time, self.last_step = time.time(), step

  def measure(self, step: int) -> dict:
    now = time.time()
    steps_per_s = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_time, self.last_step = now, step
    out = dict(steps_per_s=steps_per_s, examples_per_s=steps_per_s * self.examples_per_step)
    if self.peak_total:
      out["mfu"] = steps_per_s * self.flops_per_step / self.peak_total
    out["eta_s"] = (self.total_steps - step) / max(steps_per_s, 1e-9)
    return out


def console_line(step: int, total: int, metrics: dict, speed: dict) -> str:
  mfu = f" mfu {speed['mfu'] * 100:.1f}%" if "mfu" in speed else ""
  return (
    f"step {step}/{total} loss {metrics['loss']:.4f} (con {metrics['contrastive_loss']:.4f}"
    f" cap {metrics['captioning_loss']:.4f}) acc {metrics['contrastive_accuracy']:.3f}"
    f" tau {metrics['temperature']:.4f} lr {metrics['learning_rate']:.2e}"
    f" | {speed['examples_per_s']:.1f} ex/s {speed['steps_per_s']:.2f} steps/s{mfu}"
    f" eta {speed['eta_s'] / 60:.1f} min"
  )


def describe_frozen(config, params) -> str:
  """The log line naming the parameters config.train.frozen holds still."""
  frozen = optim.matching_names(params, tuple(config.train.frozen))
  sizes = params_lib.count_by_path(params)
  return (
    f"frozen by config.train.frozen={tuple(config.train.frozen)}: {len(frozen)} of "
    f"{len(sizes)} parameters, {sum(sizes[n] for n in frozen):,} of "
    f"{params_lib.total(params):,} scalars: {init_from.compact(frozen)}"
  )


# Metrics whose non-finite value stops the run: param_norm is of the new parameters; an
# infinite grad_norm leaves finite parameters but an infinite Adafactor second moment,
# which zeroes that parameter's updates from then on.
FINITE_METRICS = ("loss", "param_norm", "grad_norm")


@jax.jit
def first_nonfinite(first: jax.Array | None, metrics: dict, step) -> jax.Array:
  """The first step whose FINITE_METRICS were not all finite, -1 while none: updated on
  the device after every step (no host sync), read where the loop fetches metrics."""
  finite = jnp.all(jnp.asarray([jnp.isfinite(metrics[k]) for k in FINITE_METRICS]))
  now = jnp.where(finite, -1, step).astype(jnp.int32)
  return now if first is None else jnp.where(first >= 0, first, now)


def check_finite(first_bad: int, metrics: dict, step: int, mngr) -> None:
  """Stops before a non-finite state can be checkpointed or evaluated: `first_bad` is
  `first_nonfinite`'s step (-1: none), `metrics` the fetched ones of `step`."""
  if first_bad < 0:
    return
  values = ", ".join(f"{k} {metrics[k]}" for k in FINITE_METRICS)
  last = mngr.latest_step()
  raise FloatingPointError(
    f"non-finite {'/'.join(FINITE_METRICS)} first at step {first_bad} (at step {step}: "
    f"{values}); stopping. The last good checkpoint "
    f"({'none' if last is None else f'step {last}'}) is left as it was."
  )


def keep_run_answers(workdir: epath.Path, config) -> None:
  """A resume of a VQA run takes the run's answer vocabulary (config.json's
  data.vqa.answers) where `config` names none: the restored classifier's rows mean those
  answers. Rebuilt from the training files instead, a file added to them could reorder
  it, and row 0, trained as "blue", went on as "green"."""
  path = workdir / export.CONFIG_FILE
  if config.data.source != "vqa" or config.data.vqa.get("answers") or not path.exists():
    return
  answers = export.read_json(path).get("data", {}).get("vqa", {}).get("answers")
  if answers:
    config.data.vqa.answers = tuple(answers)
    logging.info("resuming with the run's %d VQA answers (%s)", len(answers), path)


def keep_changed_config(workdir: epath.Path, config, step: int) -> list[str]:
  """A resume whose config differs from the run's config.json (the optimizer, the
  schedule's train.steps, the model...) is allowed but not silent: a warning names the
  changed keys, and the earlier file is kept as config.before_step_<step>.json before
  config.json is replaced. Returns the changed keys.

  Where that file exists already, an earlier resume from this step replaced config.json
  and saved no checkpoint after it (it crashed or was stopped): the file still holds the
  config that trained the checkpoint, so it is the one compared and it is kept as it is."""
  path = workdir / export.CONFIG_FILE
  kept = workdir / f"config.before_step_{step}.json"
  source = kept if kept.exists() else path
  if not source.exists():
    return []
  before = traverse_util.flatten_dict(export.read_json(source), sep=".")
  now = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
  changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
  if changed:
    if not kept.exists():
      export.write_text(kept, path.read_text())
    shown = "; ".join(
      f"{k}: {before.get(k, '(none)')} -> {now.get(k, '(none)')}" for k in changed[:8]
    )
    more = f"; and {len(changed) - 8} more" if len(changed) > 8 else ""
    logging.warning(
      "resuming at step %d with a changed config (%s%s); the run's earlier config is kept as %s",
      step,
      shown,
      more,
      kept,
    )
  return changed


LOCK_FILE = ".lock"  # in the workdir, held by the training process (`workdir_lock`)


@contextlib.contextmanager
def workdir_lock(workdir: epath.Path):
  """Holds `<workdir>/.lock` (an flock, released when the process ends however it ends)
  for the block, on process 0 of a run in a local workdir. A second trainer started in
  the same workdir (another terminal, a retry loop overlapping a live run) had resumed
  from the first's checkpoints and written the same steps and export as it: now it stops,
  naming the process that holds the workdir. Paths like gs:// are not locked."""
  if jax.process_index() != 0 or "://" in str(workdir):
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / LOCK_FILE
  with open(str(path), "a+") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.seek(0)
      holder = lock.read().strip() or "unknown"
      error = RuntimeError(
        f"--workdir={workdir} is in use by another training process ({holder}, holding "
        f"{path}): two runs in one workdir would write the same checkpoint steps. Wait for "
        "it or stop it, or train in another workdir"
      )
      error.refused_before_start = True
      raise error from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    yield  # closing the file releases the lock


@contextlib.contextmanager
def refused_before_start():
  """Marks a ValueError or FileNotFoundError of the block, a check before the run builds
  or writes anything (a config key, a file, the mesh), so that the command line prints its
  message alone (`main`), as for a misspelt override, instead of a traceback."""
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    e.refused_before_start = True
    raise


def set_aside_earlier_configs(workdir: epath.Path) -> None:
  """A run that starts afresh in a workdir whose checkpoints were deleted (as the
  unreadable-checkpoint error advises) moves the earlier run's config.before_step_<N>.json
  to earlier_runs/<time>/: they would be taken for this run's (an export of its step N
  rebuilt the model from the earlier run's config, and a resume compared against it)."""
  earlier = sorted(workdir.glob("config.before_step_*.json"))
  if not earlier:
    return
  folder = workdir / "earlier_runs" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  folder.mkdir(parents=True, exist_ok=True)
  for path in earlier:
    path.rename(folder / path.name)
  logging.warning(
    "starting afresh: the earlier run's %s moved to %s",
    ", ".join(p.name for p in earlier),
    folder,
  )


def check_steps(config, start_step: int, workdir: epath.Path) -> None:
  """ValueError when the checkpoint is past config.train.steps: the run would count as
  finished and export the later step's parameters under a config that says fewer steps."""
  if start_step > config.train.steps:
    raise ValueError(
      f"config.train.steps={config.train.steps} is below step {start_step} of the checkpoint "
      f"in {workdir}: give train.steps >= {start_step} to resume (or to evaluate and export "
      "the finished run), or start in a new workdir"
    )


def data_position(config, shard_count: int, step: int) -> dict:
  """What a checkpoint records of the data stream: the step, and what must not change for
  a resume at that step to continue the same stream (each host skips step x its batch
  rows of its own shard)."""
  position = dict(
    step=step,
    seed=config.data.seed,
    source=config.data.source,
    global_batch_size=config.data.global_batch_size,
    data_shards=shard_count,
  )
  if config.data.source == "mixture":  # the other sources read no rates
    position["rates"] = {kind: float(rate) for kind, rate in config.data.rates.items()}
  return position


def check_data_position(config, shard_count: int, stored: dict) -> None:
  """Warns when a resume changes the data stream (checkpoints from before these fields
  were recorded hold only the step and seed): a changed seed, source, batch size, mixture
  rates or number of data shards (hosts) reads other examples (each source's rows to skip
  are step x its rows per batch now), so within the epoch some repeat or are
  skipped. Allowed (a pod slice of another size, a new batch size), but not silently."""
  current = data_position(config, shard_count, stored["step"])
  changed = [
    f"{k} {stored[k]} -> {current[k]}" for k in current if stored.get(k, current[k]) != current[k]
  ]
  if changed:
    logging.warning(
      "resuming at step %d with another data stream (%s): the data position is not exact, "
      "examples of the current epoch may repeat or be skipped",
      stored["step"],
      ", ".join(changed),
    )


def restore_or_create(config, run, mngr, shard_count: int) -> tuple[dict, int, bool]:
  """(state, start step, resumed): the latest checkpoint of `mngr`, else a new state
  (from config.train.init_from where set, which a resume ignores)."""
  restored = checkpoint.restore(mngr, run.layout)
  if restored is None:
    if config.train.init_from:
      state, _ = init_from.create(config, run)  # logs loaded / new / unused parameters
      return state, 0, False
    return state_lib.create(config, run), 0, False
  state, stored_position = restored
  start_step = int(stored_position["step"])
  logging.info("resumed from checkpoint step %d", start_step)
  check_data_position(config, shard_count, stored_position)
  if config.train.init_from:
    logging.info(
      "config.train.init_from=%s ignored: the run resumes its own checkpoint",
      config.train.init_from,
    )
  return state, start_step, True


def train(config, workdir: str) -> dict:
  """Runs training in `workdir`; returns the last fetched metrics."""
  with contextlib.ExitStack() as held:  # the workdir's lock, taken once the checks pass
    return _train(config, workdir, held)


def _train(config, workdir: str, held: contextlib.ExitStack) -> dict:
  workdir_path = epath.Path(workdir)
  # From the start: a SIGTERM during the setup (a restore, the first compilation: minutes
  # on a pod) had killed the process with a stack trace and exit status 134, which the
  # retry loop of launch/tpu_vm.sh takes for a failure.
  preemption = Preemption()
  with refused_before_start():
    # Config errors now, before anything is built, read or written, not hours into the run.
    check_config(config)
    check_workdir(workdir_path)
    # A run that resumes ignores init_from; one that starts from it needs the source,
    # named before anything is written (an error after the checkpoint manager's threads
    # started ended in their traceback).
    checkpoints = workdir_path / "checkpoints"
    resumes = checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if config.train.init_from and not resumes:
      init_from.check_source(config)
    if resumes:
      keep_run_answers(workdir_path, config)
    config = loader.resolve(config)
    loader.check_files(config)
    # The final export's destination and vocabulary, checked before the run, not after it.
    export.check_destination(str(workdir_path / "export"), export.vocab_file_of(config), config)
    logging.info("config:\n%s", config)

    run = state_lib.setup(config)
    logging.info(
      "mesh %s over %d devices: %s", dict(run.mesh.shape), run.mesh.size, run.mesh_reason
    )
    # Batch errors now, not after a restore (raises naming the processes' rows if no split).
    step_lib.check_batch_size(config, run.mesh)
  shard_count = sharding.host_shard(
    run.mesh, config.sharding_rules, config.data.global_batch_size
  ).count
  n_params = params_lib.total(run.layout.abstract["params"])
  logging.info("parameters: %s (%.1fM)", f"{n_params:,}", n_params / 1e6)

  if config.train.frozen:
    logging.info("%s", describe_frozen(config, run.layout.abstract["params"]))

  held.enter_context(workdir_lock(workdir_path))
  mngr = checkpoint.manager(workdir, config.train)
  try:
    checkpoint.check_writable(mngr, params_lib.nbytes(run.layout.abstract))
    state, start_step, resumed = restore_or_create(config, run, mngr, shard_count)
    with refused_before_start():
      check_steps(config, start_step, workdir_path)
  except BaseException:  # init_from's errors: the manager's threads had outlived them,
    mngr.close()  # and their traceback followed the error now and then
    raise
  train_step = step_lib.make_train_step(config, run)
  eval_step = step_lib.make_eval_step(config, run.layout)
  # The eval suite tokenizes class prompts and captions: its vocabulary, read once.
  vocabulary = None
  if (config.train.eval_every or config.eval.at_start) and config.eval.evals:
    vocabulary = vocab.load(config.data.vocab_path)
  finished = start_step >= config.train.steps
  if finished:  # a finished run started again: its final evaluation, export and JSON line
    logging.info("the run finished at step %d: evaluating and exporting only", start_step)
  else:
    batches = loader.batches(config, run.mesh, "train", start_step)
    batch = next(batches)
    with jax.set_mesh(run.mesh):
      compiled_step = train_step.jitted.lower(run.layout.abstract, batch).compile()
    log_memory(compiled_step)
  if preemption.requested:  # SIGTERM above: leave as a preempted run, nothing written
    mngr.close()
    logging.warning(
      "preempted: checkpoint at step %d %s; exiting before the first step",
      start_step,
      "kept" if resumed else "not needed (nothing trained yet)",
    )
    return dict(step=start_step)
  # Only now: export, load and evaluate rebuild the model from config.json, so an
  # invocation that fails above (a wrong override, a wrong --workdir, data files that match
  # nothing, a step that does not compile) must leave it as it was.
  if jax.process_index() == 0:
    workdir_path.mkdir(parents=True, exist_ok=True)
    if resumed:
      keep_changed_config(workdir_path, config, start_step)
    else:
      set_aside_earlier_configs(workdir_path)
    export.write_text(workdir_path / export.CONFIG_FILE, config.to_json_best_effort(indent=2))

  from clu import metric_writers  # imports TensorFlow: after console.quiet()

  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  preemption.catch_sigint()  # before the evaluations below: a Ctrl-C there checkpoints too
  speed = Throughput(config, start_step)
  metrics, fetched, evaluated, at_start, preempted = None, {}, {}, {}, False
  first_bad = None  # first_nonfinite's device scalar
  if config.eval.at_start and start_step == 0:
    measured = evaluate_state(
      config, state, run, eval_step, vocabulary, step=0, workdir=workdir, writer=writer
    )
    at_start = {f"{AT_START}/{k.removeprefix('eval/')}": v for k, v in measured.items()}
    speed.restart(start_step)
  elif config.eval.at_start:
    logging.info("config.eval.at_start: skipped, the run resumes at step %d", start_step)
  step = start_step
  if finished and config.train.eval_every:
    evaluated = evaluate_state(
      config, state, run, eval_step, vocabulary, step=step, workdir=workdir, writer=writer
    )
  # A save is asynchronous: whatever stops the loop (an error in an evaluation, a
  # non-finite loss) first lets the checkpoints already started finish.
  try:
    while step < config.train.steps:
      state, metrics = compiled_step(state, batch)
      step += 1
      first_bad = first_nonfinite(first_bad, metrics, step)
      preempted = preemption.reached(mngr, step)
      last = step == config.train.steps
      saving = last or preempted or step % config.train.checkpoint_every == 0
      eval_due = config.train.eval_every and (step % config.train.eval_every == 0 or last)
      if saving or eval_due or step % config.train.log_every == 0:
        fetched, bad = jax.device_get((metrics, first_bad))
        fetched = {k: float(v) for k, v in fetched.items()}
        check_finite(int(bad), fetched, step, mngr)
        if step % config.train.log_every == 0 or last:
          rates = speed.measure(step)
          logging.info("%s", console_line(step, config.train.steps, fetched, rates))
          writer.write_scalars(step, {**fetched, **rates})
      if saving:
        checkpoint.save(mngr, state, data_position(config, shard_count, step))
      # A preempted run leaves within its grace period: no evaluation (a finished run's
      # final one runs when it is started again); one under way is cut short.
      interrupted = False
      if eval_due and not preempted:
        try:
          with preemption.interruptible():
            evaluated = evaluate_state(
              config, state, run, eval_step, vocabulary, step=step, workdir=workdir, writer=writer
            )
        except Preempted:
          interrupted = preempted = True
          if not saving:
            checkpoint.save(mngr, state, data_position(config, shard_count, step))
        speed.restart(step)
      if preempted:
        evaluation = f" (its evaluation {'interrupted' if interrupted else 'skipped'})"
        logging.warning(
          "preempted: checkpoint at step %d written%s; exiting",
          step,
          evaluation if eval_due else "",
        )
        break
      if not last:
        batch = next(batches)
  finally:
    writer.flush()  # what was logged reaches TensorBoard whatever stopped the loop
    checkpoint.finish(mngr)
    preemption.close()
  # Preempted at the last step: the export, like the final evaluation, is the finished
  # run's, written when it is started again (not within the grace period).
  if step >= config.train.steps and not preempted:
    export.write(
      state["params"],
      config,
      str(workdir_path / "export"),
      config.train.export_dtype,
      export.vocab_file_of(config),
    )
  mngr.close()
  # A preempted run's latest evaluation is of an earlier step: no final report.
  if evaluated and config.eval.evals and jax.process_index() == 0 and not preempted:
    from coca_jax import evaluate
    from coca_jax.data import eval_sets

    suite = {k.removeprefix("eval/"): v for k, v in evaluated.items()}
    chance = evaluate.chance_levels(config, eval_sets.load(config))
    logging.info("final evaluation at step %d:\n%s", step, evaluate.report(suite, chance))
  final = dict(fetched, step=step, **evaluated, **at_start)
  if preempted or step < config.train.steps:  # the headline names the finished run's metrics
    return final
  return headline(config, final, trained=step > start_step)


# config.train keys that count steps or divide a step count or a batch (0 would divide by
# zero; no step would train and the untrained model be exported).
POSITIVE_TRAIN_KEYS = ("steps", "checkpoint_every", "log_every", "grad_accum_steps")


def check_config(config) -> None:
  """Raises ValueError naming the config key for settings that would otherwise fail (or
  do the wrong thing) late: at the first step's compile, the first evaluation, the
  export after the last step. Needs no devices; the trainer calls it before anything
  else."""
  train_config = config.train
  for key in POSITIVE_TRAIN_KEYS:
    config_lib.check_positive(train_config[key], f"train.{key}")
  config_lib.check_positive(config.data.global_batch_size, "data.global_batch_size")
  # Imported here, as loader imports it: tasks imports TensorFlow, which an entry point
  # imports in console.quiet (its start-up notices filtered), after this module.
  from coca_jax.data import tasks

  tasks.check_options(config.data)
  optim.check(config.optim)
  weights = dict(config.loss)
  for key, value in weights.items():  # negative: gradient ascent on that loss
    config_lib.check_number(value, f"loss.{key}", lambda v: v >= 0, "a number >= 0")
  if not any(weights.values()):
    raise ValueError(f"config.loss: every weight is 0 ({weights}): nothing would be trained")
  checkpoint.check_keep(train_config)  # Orbax's max_to_keep: 0 deletes every checkpoint
  frozen = state_lib.frozen_patterns(config)
  if frozen and not train_config.init_from:
    raise ValueError(
      f"config.train.frozen={frozen!r} needs config.train.init_from: frozen at a random "
      "initialisation, those parameters would never learn"
    )
  excluded = init_from.exclude_patterns(config)
  if excluded and not train_config.init_from:
    raise ValueError(
      f"config.train.init_exclude={excluded!r} needs config.train.init_from: without a "
      "source every parameter is initialised fresh already"
    )
  for key, zero in (("eval_every", "no periodic evaluation"), ("eval_steps", "no held-out losses")):
    if train_config[key] < 0:
      raise ValueError(f"config.train.{key}={train_config[key]} must be >= 0 (0: {zero})")
  for key, value in (
    ("train.export_dtype", train_config.export_dtype),
    ("model.dtype", config.model.dtype),
  ):
    if value not in export.DTYPES:
      raise ValueError(f"config.{key}={value!r}; expected one of {export.DTYPES}")
  if suite_evals(config):  # names checked by enabled_evals, in suite_evals
    from coca_jax.evaluate import suite

    suite.check(config)
    try:
      decode.DecodeOptions.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f"config.eval.decode: {e}") from e
  check_headline(config)


def suite_evals(config) -> list[str]:
  """The evals of config.eval.evals the run will run (ValueError naming an unknown one);
  none when it never evaluates (config.train.eval_every=0, config.eval.at_start off)."""
  if not (config.train.eval_every or config.eval.at_start):
    return []
  from coca_jax.evaluate import suite

  return suite.enabled_evals(config.eval)


def check_workdir(workdir: epath.Path) -> None:
  """Refuses a file as the workdir, and an export directory (params/, no checkpoints/):
  training would replace its config.json, from which coca_jax.export, .load and
  .evaluate rebuild it."""
  if workdir.exists() and not workdir.is_dir():
    raise ValueError(f"--workdir={workdir} is a file, not a directory")
  if (workdir / "params").exists() and not (workdir / "checkpoints").exists():
    raise ValueError(
      f"--workdir={workdir} is a coca_jax export (it holds params/ and no checkpoints/), not "
      "a training workdir: train in a new directory (config.train.init_from="
      f"{workdir} starts from this export)"
    )


def check_headline(config) -> None:
  """config.eval.headline may only name metrics that the run can produce: an eval's metric
  ("eval/<eval>/<metric>") only when config.eval.evals runs <eval>."""
  evals = suite_evals(config)
  for name, key in config.eval.headline.items():
    parts = key.split("/")
    prefix = parts[0]
    if prefix == AT_START and not config.eval.at_start:
      raise ValueError(f"config.eval.headline[{name!r}]={key!r} needs config.eval.at_start=True")
    if prefix == "eval" and not config.train.eval_every:
      raise ValueError(
        f"config.eval.headline[{name!r}]={key!r}: no periodic evaluation runs "
        "(config.train.eval_every=0)"
      )
    if prefix in ("eval", AT_START) and len(parts) == 2 and not config.train.eval_steps:
      raise ValueError(
        f"config.eval.headline[{name!r}]={key!r}: no held-out loss is measured "
        "(config.train.eval_steps=0)"
      )
    # Two parts ("eval/loss") name a held-out loss, which needs no eval of the suite.
    if prefix in ("eval", AT_START) and len(parts) > 2 and parts[1] not in evals:
      raise ValueError(
        f"config.eval.headline[{name!r}]={key!r}: eval {parts[1]!r} is not among the evals "
        f"the run runs (config.eval.evals={config.eval.evals!r})"
      )
    if parts[1:3] == ["zero_shot", "held_out"] and len(parts) == 4:
      _check_held_out_headline(config, name, key, parts[3])


def _check_held_out_headline(config, name: str, key: str, metric: str) -> None:
  """zero_shot/held_out/top<k> ranks the held-out images among the held-out classes
  only: with k or fewer of them it is always 1 and not reported (it failed the run
  after training, when the final metrics lacked it)."""
  held_out = tuple(config.data.jft_style.get("held_out_classes", ()))
  k = int(metric[3:]) if metric.startswith("top") and metric[3:].isdigit() else 0
  if k and len(held_out) <= k:
    raise ValueError(
      f"config.eval.headline[{name!r}]={key!r}: config.data.jft_style.held_out_classes="
      f"{held_out!r} holds {len(held_out)} classes, and top-{k} among them is always 1, "
      f"so it is not reported: hold out more than {k} classes, or name "
      f"eval/zero_shot/top{k} (all classes)"
    )


def headline(config, final: dict, trained: bool = True) -> dict:
  """`final` plus config.eval.headline's names for some of its metrics. A metric from
  before the first step is absent after a resume (it is not measured again), and a
  training metric when no step ran (`trained` False: a finished run started again):
  skipped."""
  named = {}
  for name, key in config.eval.headline.items():
    if key in final:
      named[name] = final[key]
    elif key.startswith(AT_START + "/") or not (trained or key.startswith("eval/")):
      logging.info("headline %s: %s not measured in this (resumed) run", name, key)
    else:
      raise ValueError(
        f"config.eval.headline[{name!r}]={key!r} is not among the final metrics: {sorted(final)}"
      )
  return {**final, **named}


def main(argv):
  console.quiet(start=False)  # backends after tune_for_cpu and the distributed runtime
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  host_memory.tune_for_cpu()  # before JAX's CPU client exists
  if f.config is None:
    raise app.UsageError("--config is required (e.g. --config=configs/demo.py)")
  multihost.initialize(f.coordinator_address, f.num_processes, f.process_id)
  try:
    final = train(f.config, f.workdir)
  except KeyboardInterrupt:  # Ctrl-C in the setup, or a second one (Preemption)
    # At once: the interpreter's exit after a compilation cut short had ended in a
    # segmentation fault (exit status 139).
    console.exit_now("interrupted (Ctrl-C); the checkpoints already written are kept", 130)
  except FloatingPointError as e:
    logging.error("%s", e)
    print(str(e), file=sys.stderr)
    sys.exit(1)
  except checkpoint.SaveError as e:
    console.exit_now(str(e))
  except Exception as e:
    if getattr(e, "refused_before_start", False):
      if jax.process_count() == 1:
        sys.exit(f"error: {e}")
      # At once, as below: a check may fail on one process only (the workdir's lock is
      # process 0's, a local file may be missing on one host); a normal exit waited 5
      # minutes at jax.distributed's shutdown barrier while the others went on into the
      # checkpoint manager's collectives, then aborted them all.
      console.exit_now(f"error: {e}")
    if jax.process_count() == 1:
      raise
    # One process's error (a bad record in its data shard) leaves the others inside a
    # collective: a normal exit would wait for them at jax.distributed's shutdown barrier
    # for 5 minutes, then abort every process. Leaving at once fails their collectives.
    console.exit_now(
      f"process {jax.process_index()} of {jax.process_count()} stopped on this error, "
      f"without waiting for the others:\n{traceback.format_exc()}"
    )
  if jax.process_index() == 0:
    print(json.dumps(final))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
