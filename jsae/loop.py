"""The one training loop, shared by a single run (`jsae.train`) and a sweep (`jsae.sweep`).

    with loop.Session(config, workdir, source=source) as session:   # workdir, checkpoints, data
      ... restore or initialise ...
      end = loop.run_steps(trainee, session, config, start=start, num_steps=n, ...)

A run and a sweep differ only in what they train (the `Trainee`): one SAE's
TrainState, or a sweep's groups of stacked members. `run_steps` does the rest
once: batch(step) for every step from `start`, the step, logging / held-out /
checkpoint steps, SIGTERM and Ctrl-C (save, then stop), the progress bar.

Also here, the pieces both trainees use for each SAE: the workdir, the metrics
log, the held-out batches and their metrics, the initial decoder bias, the log
record of a step, and the health checks of a run that fails without NaN.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from jsae import checkpoint, data, evals, jsonio, sharding, stopping
from jsae import sae as sae_lib


# ----------------------------------------------------------------------------- the session


def prepare_workdir(workdir: str | os.PathLike):
  """Creates `workdir` (local or e.g. gs://) and checks it is writable."""
  path = (epath.Path(workdir) if "://" in str(workdir)
          else epath.Path(Path(workdir).expanduser().absolute()))
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test.{os.getpid()}"  # unique: several processes share a workdir
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise OSError(f"workdir {path} is not writable ({e.strerror}); pass a"
                  " --workdir you can write to.") from e
  return path


def say(message: str) -> None:
  """Prints a `[jsae]` line above the progress bar (process 0 only)."""
  if jax.process_index() == 0:
    tqdm.write(f"[jsae] {message}")


class Session:
  """A run's workdir, its checkpoint manager and its data source, closed together.

  The source opens on first use (`source`), so a resume check against the
  checkpoint can refuse a run before any data is read. A source passed in is
  the caller's to close.

  Attributes:
    workdir: the run directory (created, checked writable).
    manager: the Orbax CheckpointManager over `workdir/checkpoints`.
  """

  def __init__(self, config, workdir, *, source=None):
    self.workdir = prepare_workdir(workdir)
    self.manager = checkpoint.make_manager(self.workdir, max_to_keep=config.ckpt.max_to_keep,
                                           async_save=config.ckpt.async_save)
    self._config, self._source, self._own_source = config, source, source is None

  @property
  def source(self):
    """The activation source (the config's, opened now if not yet)."""
    if self._source is None:
      self._source = data.make_source(self._config)
    return self._source

  def __enter__(self) -> "Session":
    return self

  def __exit__(self, *exc) -> None:
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()
      if self._own_source and self._source is not None:
        self._source.close()


class MetricsLog:
  """metrics.jsonl: one JSON line per logged step, written by process 0.

  Lines logged after the last checkpoint of an interrupted run are redone on
  resume, so they are dropped at start to keep one line per step. Object
  stores (gs://) cannot append, so there the file is rewritten at each write.
  Non-finite numbers are written as JSON null.
  """

  def __init__(self, workdir, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self.lines = []
    if self.path.exists():
      self.lines = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
    self.path.write_text("".join(line + "\n" for line in self.lines))
    self._local = "://" not in str(self.path)

  def write(self, record: dict) -> None:
    """Appends one record."""
    line = json.dumps(jsonio.finite_or_none(record), allow_nan=False)
    self.lines.append(line)
    if self._local:
      with open(self.path, "a") as f:
        f.write(line + "\n")
    else:
      self.path.write_text("".join(l + "\n" for l in self.lines))

  def last(self) -> dict | None:
    """The newest record, or None before the first."""
    return json.loads(self.lines[-1]) if self.lines else None


# ----------------------------------------------------------------------------- each SAE


def step_events(config, done: int, num_steps: int, evaluating: bool
                ) -> tuple[bool, bool, bool]:
  """(log, checkpoint, held-out eval) after `done` of `num_steps` steps; the last step
  does all three, and an eval step is logged too."""
  last = done == num_steps
  is_ckpt = done % config.ckpt.every_steps == 0 or last
  is_eval = evaluating and (done % config.eval.every_steps == 0 or last)
  is_log = done % config.train.log_every == 0 or last or is_eval
  return is_log, is_ckpt, is_eval


# The trainers compile a second, lean step for the steps that neither log nor save: no
# metrics, so no extra passes over the step's [batch, d_sae] latents. It pays only when
# those passes cost something and over enough steps. Measured on the 2-core CPU machine
# (compiling the lean step: 0.4 to 1.2 s), the lean step saves, per step:
#   JumpReLU   512 x 256 latents (configs/tiny.py, 2^17 cells): nothing (0.80 of 0.83 ms);
#   JumpReLU  1024 x 1024 (2^20): 1.8 ms of 7.0;  Matryoshka: 2.6 ms of 28.4;
#   JumpReLU  1024 x 4096 at d_in 640 (2^22): 26 ms of 208 (its compile back in ~20 steps).
# A run below either bound runs the logging step throughout: one program, not two. (The
# cells are the global batch's: on N devices each does 1/N of them for the same compile,
# so a mesh may still compile the lean step where it saves less; the bounds were measured
# on one CPU device. A sweep decides for all its groups at once, from their total.)
MIN_LEAN_STEPS = 50
MIN_LEAN_CELLS = 2**19


def uses_lean_steps(config, num_steps: int, evaluating: bool, latent_cells: int) -> bool:
  """Whether a run compiles the lean step: its steps' metrics pass over at least
  `MIN_LEAN_CELLS` latent cells (`Trainee.latent_cells`), and it has `MIN_LEAN_STEPS`
  steps that neither log nor save, counted from step 0 (so that a resumed run decides as
  the unbroken one)."""
  if (latent_cells < MIN_LEAN_CELLS or config.train.log_every <= 1
      or config.ckpt.every_steps <= 1 or (evaluating and config.eval.every_steps <= 1)):
    return False  # (and no scan of a long run's every step)
  lean = 0
  for done in range(1, num_steps + 1):
    is_log, is_ckpt, _ = step_events(config, done, num_steps, evaluating)
    lean += not (is_log or is_ckpt)
    if lean >= MIN_LEAN_STEPS:
      return True
  return False


def norm_scales(source):
  """What `SAE.from_training` folds with: C of an SAE's data, or a transcoder's
  (C of its input, C of its target)."""
  target = getattr(source, "target_norm_scale", None)
  return source.norm_scale if target is None else (source.norm_scale, target)


def initial_b_dec(config, source) -> np.ndarray:
  """Mean of the first `init_b_dec_batches` batches' targets, in normalised units:
  `[d_out]` (the rows themselves for an SAE, the y side of a transcoder's pairs).

  Residual streams with massive constant dimensions (Gemma) put most of E||x||^2
  in the mean; starting b_dec there saves the many Adam steps (~lr each) it
  would otherwise take to get there. A function of (seed, steps), so exact.
  """
  target_scale = getattr(source, "target_norm_scale", None)
  first = 0 if target_scale is None else config.sae.d_in  # where y starts in a row
  total, rows = None, 0
  for step in range(config.sae.init_b_dec_batches):
    batch = np.asarray(source.batch(step), np.float64)[:, first:]
    total = batch.sum(0) + (0 if total is None else total)
    rows += len(batch)
  if jax.process_count() > 1:  # every process must start from the same mean
    from jax.experimental import multihost_utils
    total = np.asarray(multihost_utils.process_allgather(total)).sum(0)
    rows *= jax.process_count()
  scale = source.norm_scale if target_scale is None else target_scale
  return (total / rows / scale).astype(np.float32)


def held_out_batches(config, batch_sharding) -> list:
  """`config.eval.batches` fixed held-out batches as global arrays ([] when off)."""
  if config.eval.every_steps <= 0:
    return []
  source = data.make_eval_source(config)
  if source is None:
    say("eval.every_steps is set but there is no held-out data (set"
        " config.data.eval_shards_dir, or config.eval.every_steps=0 to turn the checks"
        " off); skipping held-out checks.")
    return []
  try:
    return [sharding.global_batch(source.batch(i), batch_sharding, config.data.batch_size)
            for i in range(config.eval.batches)]
  finally:
    source.close()


def held_out_metrics(params, family_state, batches: list, norm_scale) -> dict:
  """FVU, L0 and dead fraction (never fired on the set) of the inference form on held-out
  batches (raw rows; a transcoder's [x, y] pairs, `norm_scale` its `norm_scales`)."""
  transcoder = isinstance(norm_scale, (tuple, list))  # (C of x, C of y): `norm_scales`
  model = sae_lib.SAE.from_training(params, norm_scale, state=family_state,
                                    transcoder=transcoder)
  weights = [jnp.ones(b.shape[0], jnp.float32) for b in batches]
  m = evals.activation_metrics(model, zip(batches, weights), d_in=model.d_in, d_sae=model.d_sae,
                               d_out=model.d_out if model.transcoder else None)
  return {"eval_fvu": m["fvu"], "eval_l0": m["l0"], "eval_dead_frac": m["dead_frac"]}


@dataclasses.dataclass
class Clock:
  """Throughput since the loop started (for each logged record)."""

  start_step: int
  batch_size: int
  t0: float = dataclasses.field(default_factory=time.perf_counter)

  def tokens_per_s(self, done: int) -> float:
    """Tokens a second over the steps run since the start."""
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    return (done - self.start_step) * self.batch_size / elapsed


def step_record(metrics: dict, *, done: int, batch_size: int, lr: float, clock: Clock
                ) -> dict:
  """One metrics.jsonl record: the step's metrics (host floats) and where the run is."""
  return dict(metrics, step=done, tokens=done * batch_size, lr=float(lr),
              tokens_per_s=clock.tokens_per_s(done))


# FVU this far above 1 (worse than predicting the mean) or every latent dead, past
# the learning-rate warmup and the dead window: the run is failing without a NaN.
EXPLODED_FVU = 2.0


def health_warning(metrics: dict, done: int, config) -> str | None:
  """A warning for an SAE failing without NaN (FVU far above 1, every latent dead)."""
  if done <= max(config.optim.warmup_steps, config.loss.dead_window_steps):
    return None
  fvu = metrics.get("fvu", 0.0)
  if fvu is not None and fvu > EXPLODED_FVU:
    return (f"FVU {fvu:.3g} at step {done}: the SAE reconstructs worse than"
            " the data's mean; the run is probably diverging (lower config.optim.lr).")
  if (metrics.get("dead_frac") or 0.0) >= 1.0:
    return (f"every latent is dead at step {done} (none fired in"
            f" {config.loss.dead_window_steps} steps); the sparsity penalty or threshold is"
            " too strong for this data (lower the sparsity coefficient).")
  return None


def non_finite(metrics: dict) -> list[str]:
  """Names of the metrics that are NaN or infinite."""
  return [k for k, v in metrics.items()
          if isinstance(v, float) and not math.isfinite(v)]


# ----------------------------------------------------------------------------- the loop


class Trainee(abc.ABC):
  """What `run_steps` trains: one SAE (`train`) or a sweep's groups (`sweep`)."""

  @abc.abstractmethod
  def step(self, batch: jax.Array, *, with_metrics: bool) -> None:
    """One update on the global `batch: [batch, d_in]`; metrics only when asked."""

  @abc.abstractmethod
  def observe(self, done: int, *, evaluate: bool, clock: Clock) -> None:
    """After a step with metrics: check, log (held-out metrics when `evaluate`);
    may raise to stop the run (a divergence)."""

  @abc.abstractmethod
  def save(self, manager, done: int) -> None:
    """Writes checkpoint `done`."""

  @abc.abstractmethod
  def latent_cells(self) -> int:
    """The `[batch, d_sae]` latent cells of one step, over all its SAEs (what a logging
    step's metrics pass over)."""

  def postfix(self) -> dict:
    """The progress bar's figures after the last `observe`."""
    return {}


@dataclasses.dataclass
class LoopEnd:
  """Where `run_steps` stopped.

  Attributes:
    done: the step reached.
    preempted: True when SIGTERM or Ctrl-C stopped the loop (after a checkpoint).
    stop_reason: 'SIGTERM' or 'Ctrl-C' when preempted, else None.
  """

  done: int
  preempted: bool = False
  stop_reason: str | None = None


def run_steps(trainee: Trainee, session: Session, config, *, start: int, num_steps: int,
              batch_sharding, evaluating: bool, progress: bool = True, desc: str = "train"
              ) -> LoopEnd:
  """Steps `start` .. `num_steps` - 1 of `trainee` on `session.source`'s batches.

  `config` gives the batch size and the logging / checkpoint / eval periods
  (`step_events`). A stop request (SIGTERM, Ctrl-C) saves after the current
  step and returns; the same command resumes from that checkpoint.
  """
  batch_size = config.data.batch_size
  clock = Clock(start, batch_size)
  bar = tqdm(total=num_steps, initial=start, unit="step", dynamic_ncols=True, desc=desc,
             disable=not progress or jax.process_index() != 0, mininterval=1.0)
  lean = uses_lean_steps(config, num_steps, evaluating, trainee.latent_cells())
  with bar, stopping.StopRequests(session.manager) as stop:
    for step in range(start, num_steps):
      batch = sharding.global_batch(session.source.batch(step), batch_sharding, batch_size)
      done = step + 1
      is_log, is_ckpt, is_eval = step_events(config, done, num_steps, evaluating)
      trainee.step(batch, with_metrics=is_log or is_ckpt or not lean)
      if is_log or is_ckpt:
        trainee.observe(done, evaluate=is_eval, clock=clock)
        bar.set_postfix(trainee.postfix(), refresh=False)
      preempted = stop.reached(done) and done < num_steps
      if is_ckpt or preempted:
        trainee.save(session.manager, done)
      bar.update(1)
      if preempted:
        say(f"stopped by {stop.reason}: saved checkpoint {done} in"
            f" {session.manager.directory}; run the same command again to resume.")
        return LoopEnd(done=done, preempted=True, stop_reason=stop.reason)
  return LoopEnd(done=max(start, num_steps))


__all__ = ["Clock", "EXPLODED_FVU", "LoopEnd", "MIN_LEAN_CELLS", "MIN_LEAN_STEPS",
           "MetricsLog", "Session", "Trainee", "health_warning", "held_out_batches",
           "held_out_metrics", "initial_b_dec", "non_finite", "norm_scales", "prepare_workdir",
           "run_steps", "say", "step_events", "step_record", "uses_lean_steps"]
