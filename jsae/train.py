"""Training one SAE: the TrainState pytree, a pure jitted train_step, and train(config, workdir).

`train` runs in fixed sections: validate -> data -> model/optimizer -> restore
or init -> compile -> the loop (`jsae.loop.run_steps`, which a sweep runs too;
here its trainee is one SAE: `_OneSAE`). Running it again on the same workdir
resumes from the latest checkpoint; because batches are a function of
(seed, step), N steps + restart + N steps equals 2N uninterrupted steps bit for
bit. A finished run says so and returns its final metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import struct

P = jax.sharding.PartitionSpec

from jsae import checkpoint, jsonio, loop, losses, optim, recipe, resume, saes, sharding
from jsae.ops import sparse
from jsae import config as config_lib


@struct.dataclass
class TrainState:
  """Everything that changes during training.

  Attributes:
    step: `[]` int32, number of updates applied; the next batch is batch(step).
    params: the SAE family's parameter pytree.
    opt_state: optimizer state (float32, following its parameter).
    steps_since_fired: `[d_sae]` int32 steps since each latent last fired.
    family_state: the family's own slot (BatchTopK's running threshold, the lambda
      controller's `L0Control`; `NoState()`).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  steps_since_fired: jax.Array
  family_state: Any = None


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static (hashable) settings of `train_step`, derived once from the config.

  Attributes:
    family: the SAE family's name.
    loss: the family's static settings (its `settings(config)`).
    dead_window_steps: a latent silent this long counts as dead.
    dense_threshold: a latent firing on more tokens than this share is dense.
    decoder_unit_norm: renormalise decoder rows after every update.
    norm_scale: C, the data's normalisation constant (a transcoder's input's).
    target_norm_scale: a transcoder's C of its target (None: an SAE).
    d_in: a transcoder's input width: its batch rows are [x, y] (`split_batch`).
  """

  family: str
  loss: Any
  dead_window_steps: int
  dense_threshold: float
  decoder_unit_norm: bool
  norm_scale: float
  target_norm_scale: float | None = None
  d_in: int = 0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, norm_scale: float,
                  target_norm_scale: float | None = None) -> "StepSettings":
    """Reads the step's settings from `config`; `norm_scale` is the data's C (and
    `target_norm_scale` a transcoder's target's: `source.target_norm_scale`)."""
    family = saes.get(config.sae.family)
    transcoder = saes.base.is_transcoder(config)
    if transcoder and target_norm_scale is None:
      raise ValueError("a transcoder's step needs target_norm_scale, its target's C.")
    return cls(
        family=family.name, loss=family.settings(config),
        dead_window_steps=int(config.loss.dead_window_steps),
        dense_threshold=float(config.train.dense_threshold),
        decoder_unit_norm=bool(config.optim.decoder_unit_norm),
        norm_scale=float(norm_scale),
        target_norm_scale=float(target_norm_scale) if transcoder else None,
        d_in=int(config.sae.d_in) if transcoder else 0)


def split_batch(batch: jax.Array, settings: StepSettings) -> tuple[jax.Array, jax.Array | None]:
  """(x, y) in normalised float32 units from raw rows: `[batch, d_in]` (an SAE: y is
  None, the target is x) or a transcoder's `[batch, d_in + d_out]` pairs."""
  rows = batch.astype(jnp.float32)
  if settings.target_norm_scale is None:
    return rows / settings.norm_scale, None
  return (rows[:, :settings.d_in] / settings.norm_scale,
          rows[:, settings.d_in:] / settings.target_norm_scale)


def hyperparams(config: ml_collections.ConfigDict) -> dict:
  """The family's traced hyperparameters (the sparsity knob), as `train_step`'s argument."""
  return saes.get(config.sae.family).hyperparams(config)


def init_params(key: jax.Array, config: ml_collections.ConfigDict):
  """Fresh SAE parameters for `config.sae`."""
  family = saes.get(config.sae.family)
  return family.init(key, d_in=config.sae.d_in, d_sae=config.sae.d_sae,
                     **family.init_kwargs(config))


def initial_pre_activations(config: ml_collections.ConfigDict, source, b_dec=None
                            ) -> np.ndarray:
  """The fresh SAE's pre-activations on the first rows of data, `[rows, d_sae]` float32
  in normalised units (`recipe.sample_rows` rows; `b_dec: [d_in]` the initial decoder
  bias the encoder subtracts, None: zeros). A function of (seed, data seed)."""
  params = init_params(jax.random.key(config.seed), config)
  if b_dec is not None:
    params = params.replace(b_dec=jnp.asarray(b_dec, jnp.float32))
  want = recipe.sample_rows(config.sae.d_sae, config.data.batch_size)
  rows = []
  for step in range(-(-want // config.data.batch_size)):
    local = np.asarray(source.batch(step), np.float32)[:, :config.sae.d_in]
    if jax.process_count() > 1:  # the global batch, in process order, as one process reads it
      from jax.experimental import multihost_utils
      local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, local.shape[-1])
    rows.append(local)
  x = np.concatenate(rows)[:want] / source.norm_scale
  family = saes.get(config.sae.family)
  return np.asarray(jax.jit(family.pre_activations)(params, x))


def recipe_values(config: ml_collections.ConfigDict, source, num_steps: int, b_dec=None
                  ) -> dict:
  """recipe 'auto''s {'group.field': value} for `config` (`recipe.derive`), announced in
  the log; every process derives them from the same global rows."""
  values = recipe.derive(config, initial_pre_activations(config, source, b_dec), num_steps)
  loop.say(recipe.describe(values, recipe.set_by_hand(config)))
  return values


def resolve_recipe(config: ml_collections.ConfigDict, source, num_steps: int, b_dec=None
                   ) -> ml_collections.ConfigDict:
  """`config` with recipe 'auto''s values written in (`config` itself for 'gemma_scope')."""
  if config.get("recipe", "gemma_scope") != "auto":
    return config
  return recipe.apply(config, recipe_values(config, source, num_steps, b_dec))


def create_state(key: jax.Array, config: ml_collections.ConfigDict,
                 optimizer: optax.GradientTransformation, b_dec=None) -> TrainState:
  """The TrainState at step 0; `b_dec: [d_out]` (normalised units) overrides the zero init."""
  family = saes.get(config.sae.family)
  params = init_params(key, config)
  if b_dec is not None:
    params = params.replace(b_dec=jnp.asarray(b_dec, jnp.float32))
  return TrainState(
      step=jnp.zeros([], jnp.int32), params=params,
      opt_state=optimizer.init(params),
      steps_since_fired=jnp.zeros([config.sae.d_sae], jnp.int32),
      family_state=family.init_state(config.sae.d_sae, family.settings(config)))


def train_step(state: TrainState, batch: jax.Array, hparams: dict, *,
               settings: StepSettings, optimizer: optax.GradientTransformation,
               with_metrics: bool = True) -> tuple[TrainState, dict]:
  """One update on `batch: [batch, d_in]` (raw LM units; a transcoder's
  `[batch, d_in + d_out]` pairs); returns (state, metrics).

  `hparams` holds the family's traced hyperparameters (`hyperparams(config)`),
  passed as an argument so that a sweep can vmap over them. Metrics are float32
  scalars measured on the parameters *before* the update. With
  `with_metrics=False` (static) only the loss is returned: the other metrics are
  extra passes over `[batch, d_sae]` that the trainer needs only on logging
  steps, so it compiles both variants when a run has enough steps between its logs
  (`loop.uses_lean_steps`).
  """
  family = saes.get(settings.family)
  x, y = split_batch(batch, settings)
  dead = state.steps_since_fired >= settings.dead_window_steps

  def loss_fn(params):
    return family.loss(params, state.family_state, x, settings=settings.loss,
                       hparams=hparams, dead=dead, step=state.step, target=y)

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optim.apply_updates(state.params, updates, family=family,
                               decoder_unit_norm=settings.decoder_unit_norm,
                               settings=settings.loss)

  fired = jnp.any(out.f != 0, axis=0) if out.fired is None else out.fired  # [d_sae]
  steps_since_fired = jnp.where(fired, 0, state.steps_since_fired + 1)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                         steps_since_fired=steps_since_fired, family_state=out.state)
  if not with_metrics:
    return new_state, dict(loss=loss)
  metrics = _step_metrics(loss, out, x if y is None else y, out.f != 0, steps_since_fired,
                          grads, settings)
  metrics.update(family.metrics(out, settings.loss))
  return new_state, metrics


def _step_metrics(loss, out, target, fires, steps_since_fired, grads, settings):
  """Loss and its parts, sparsity, fidelity (of `target`) and latent health (any family)."""
  firing_rate = jnp.mean(fires.astype(jnp.float32), axis=0)
  return dict(
      loss=loss, **out.parts,
      l0=jnp.mean(jnp.sum(fires.astype(jnp.float32), axis=-1)),
      fvu=losses.fvu(target, out.x_hat),
      dead_frac=jnp.mean((steps_since_fired >= settings.dead_window_steps
                          ).astype(jnp.float32)),
      dense_frac=jnp.mean((firing_rate > settings.dense_threshold).astype(jnp.float32)),
      grad_norm=optax.global_norm(grads))


def restore_state(workdir, target: TrainState, step: int | None = None) -> TrainState:
  """Checkpoint `step`'s (default: the latest) TrainState in `target`'s structure and
  shardings (CheckpointDamagedError when its files cannot be read).

  Fields are restored by name, so a checkpoint written before the family
  state existed (jsae 0.1) resumes when the family keeps none. A manager of its
  own: Orbax fixes an item's handler at first use, and the run's manager saves.
  """
  manager = checkpoint.make_manager(workdir, async_save=False)
  try:
    names = [f.name for f in dataclasses.fields(TrainState)
             if f.name != "family_state" or jax.tree.leaves(target.family_state)]
    step = manager.latest_step() if step is None else step
    fields = checkpoint.restore_fields(manager, step,
                                       {n: getattr(target, n) for n in names})
  finally:
    manager.close()
  fields.setdefault("family_state", target.family_state)
  return TrainState(**fields)


class TrainingDivergedError(RuntimeError):
  """Loss or parameters became NaN/Inf; the message names the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the final state and the last logged metrics.

  Attributes:
    state: the TrainState after the last step run.
    metrics: the last logged metrics.
    steps: the step reached (== total steps unless preempted).
    workdir: the run directory.
    preempted: True when SIGTERM or Ctrl-C stopped the run early (after a checkpoint).
    stop_reason: 'SIGTERM' or 'Ctrl-C' when preempted, else None.
    warnings: signs of a failing run without NaN (`loop.health_warning`), newest last.
    complete_before: the run had already trained every step (nothing ran;
      `metrics` is its last logged record).
  """

  state: TrainState
  metrics: dict
  steps: int
  workdir: epath.Path
  preempted: bool = False
  stop_reason: str | None = None
  warnings: list = dataclasses.field(default_factory=list)
  complete_before: bool = False


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


def _resume_point(manager, config, allow_changes: tuple[str, ...], say) -> tuple:
  """(meta, changes) of the newest readable checkpoint; (None, {}) for a fresh run.

  Raises ConfigError when it belongs to another run (`resume.check_compatible`).
  """
  step, meta = checkpoint.newest_intact(
      manager, functools.partial(checkpoint.read_meta, manager), say=say)
  if meta is None:
    return None, {}
  return meta, resume.check_compatible(meta, config, manager.directory,
                                       allow_changes=allow_changes)


def _saved_opt_state(meta: dict, config, num_steps: int, params_abstract):
  """The abstract optimizer state of the optimizer the checkpoint was trained with.

  Differs from today's when an allowed change adds or removes a stateless
  transform (gradient clipping); `optim.transplant_chain_state` maps it over.
  """
  saved = config.optim.to_dict()
  saved.update((meta.get("config") or {}).get("optim") or {})
  saved_optimizer = optim.make_optimizer(ml_collections.ConfigDict(saved), total_steps=num_steps)
  return jax.eval_shape(saved_optimizer.init, params_abstract)


def _restore_newest_intact(workdir, manager, target: TrainState, saved_opt_state, mesh,
                           family, say) -> tuple[int, TrainState]:
  """(step, state): the newest checkpoint that reads, into `target`; damaged newer
  steps move to WORKDIR/damaged_checkpoints (so this run can write those steps again)."""
  reshape_opt = jax.tree.structure(saved_opt_state) != jax.tree.structure(target.opt_state)
  read_target = target
  if reshape_opt:  # read the saved optimizer's state, then map it onto today's
    saved = target.replace(opt_state=saved_opt_state)
    read_target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), saved,
        sharding.named(mesh, sharding.state_specs(saved, family)))
  step, state = checkpoint.resume_newest_intact(
      workdir, manager, functools.partial(restore_state, workdir, read_target), say=say)
  if reshape_opt:
    state = state.replace(opt_state=optim.transplant_chain_state(state.opt_state,
                                                                 target.opt_state))
  return step, state


def _divergence_message(bad: list[str], done: int, last_checked: int, last_good,
                        directory) -> str:
  """TrainingDivergedError's text: what, between which steps, and how to continue."""
  where = (f"between step {last_checked} and step {done}" if last_checked < done - 1
           else f"at step {done}")
  if last_good is None:
    resume_hint = ("No checkpoint was saved yet, so the same command with a lower"
                   " --config.optim.lr (or --config.optim.clip_grad_norm=1.0) starts afresh.")
  else:
    resume_hint = (f"The last good checkpoint is step {last_good} in {directory} (kept)."
                   " To continue it, rerun the same command with, for example,"
                   " --config.optim.lr=<lower> --allow_changes=optim.lr or"
                   " --config.optim.clip_grad_norm=1.0 --allow_changes=optim.clip_grad_norm.")
  return (f"training diverged: {', '.join(bad)} became non-finite {where}. {resume_hint}"
          " Also check the data for NaN/Inf (jsae shards verify).")


class _OneSAE(loop.Trainee):
  """One SAE for `loop.run_steps`: its state, compiled steps, log and checks.

  A non-finite metric (or, on checkpoint steps, parameter) stops the run with
  TrainingDivergedError naming the steps and the last good checkpoint.
  """

  def __init__(self, config, session: loop.Session, *, state: TrainState, step_fns,
               hparams, capacity: "_SparseCapacity", meta: dict, held_out: list,
               num_steps: int):
    self.config, self.session, self.state = config, session, state
    self._step_fns, self._hparams, self.capacity = step_fns, hparams, capacity
    self._meta, self.held_out, self._num_steps = meta, held_out, num_steps
    start = int(state.step)
    self.log = loop.MetricsLog(session.workdir, start) if jax.process_index() == 0 else None
    self.last_good = session.manager.latest_step()
    self.last_checked = start  # the newest step whose metrics were finite
    self.metrics: dict = {}
    self.warnings: list[str] = []
    self._device_metrics = None

  def latent_cells(self) -> int:
    return self.config.data.batch_size * self.config.sae.d_sae

  def step(self, batch, *, with_metrics: bool) -> None:
    self.state, self._device_metrics = self._step_fns(with_metrics, self.capacity.now)(
        self.state, batch, self._hparams)

  def observe(self, done: int, *, evaluate: bool, clock: loop.Clock) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(self._device_metrics).items()}
    self.capacity.observe(metrics)
    self._check_finite(metrics, done)
    if evaluate:
      metrics.update(loop.held_out_metrics(self.state.params, self.state.family_state,
                                           self.held_out, loop.norm_scales(self.session.source)))
    self.metrics = loop.step_record(
        metrics, done=done, batch_size=self.config.data.batch_size,
        lr=optim_lr(self.config, self._num_steps, done - 1), clock=clock)
    if self.log is not None:
      self.log.write(self.metrics)
    warning = loop.health_warning(self.metrics, done, self.config)
    if warning and not self.warnings:  # once per run: the summary repeats the last one
      loop.say(f"warning: {warning}")
    if warning:
      self.warnings = [warning]

  def _check_finite(self, metrics: dict, done: int) -> None:
    """Raises TrainingDivergedError when a metric, or on a checkpoint step a parameter,
    is not finite."""
    bad = loop.non_finite(metrics)
    is_ckpt = done % self.config.ckpt.every_steps == 0 or done == self._num_steps
    if is_ckpt and not bad and not bool(_all_finite(self.state.params)):
      bad = ["parameters"]
    if bad:
      if jax.process_index() == 0:
        resume.record_history(self.session.workdir, "diverged", done, non_finite=bad,
                              last_good_checkpoint=self.last_good)
      raise TrainingDivergedError(_divergence_message(
          bad, done, self.last_checked, self.last_good, self.session.manager.directory))
    self.last_checked = done

  def save(self, manager, done: int) -> None:
    checkpoint.save(manager, done, self.state, self.capacity.record(self._meta))
    self.last_good = done

  def postfix(self) -> dict:
    m = self.metrics
    return dict(loss=f"{m['loss']:.4g}", L0=f"{m['l0']:.1f}", FVU=f"{m['fvu']:.3f}",
                dead=f"{m['dead_frac']:.2f}")


def _finished_metrics(workdir) -> dict:
  """The last metrics.jsonl record of a finished run ({} if it has none)."""
  path = workdir / "metrics.jsonl"
  lines = [l for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
  return json.loads(lines[-1]) if lines else {}


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          progress: bool = True, source=None, allow_changes: tuple[str, ...] = ()
          ) -> TrainResult:
  """Trains an SAE as `config` says, in `workdir`; resumes if it holds a checkpoint.

  Args:
    config: a config derived from `configs/default.py`.
    workdir: run directory (checkpoints, config.json, metrics.jsonl).
    progress: show a progress bar.
    source: an `ActivationSource` to use instead of the one the config names.
    allow_changes: fields of config.optim / config.loss that may differ from the
      checkpoint's when resuming (recorded in WORKDIR/history.jsonl).

  Returns:
    A TrainResult with the final state and last metrics (a finished run's
    final metrics when there was nothing left to train: `complete_before`).
  """
  # -- Validate, before any compilation.
  config_lib.validate(config)
  num_steps = config_lib.total_steps(config)
  with loop.Session(config, workdir, source=source) as session:
    workdir, manager = session.workdir, session.manager
    b_dec = (loop.initial_b_dec(config, session.source) if config.sae.init_b_dec == "mean"
             else None)
    config = resolve_recipe(config, session.source, num_steps, b_dec)
    meta, changes = _resume_point(manager, config, allow_changes, loop.say)

    # -- Data.
    resume.check_source(config, session.source, meta, manager.directory)
    settings = StepSettings.from_config(
        config, session.source.norm_scale, getattr(session.source, "target_norm_scale", None))

    # -- Mesh, model and optimizer; restore or init, already sharded.
    family = saes.get(config.sae.family)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_divisible(mesh, d_sae=config.sae.d_sae, batch_size=config.data.batch_size)
    optimizer = optim.make_optimizer(config.optim, total_steps=num_steps)
    init = functools.partial(create_state, config=config, optimizer=optimizer)
    key = jax.random.key(config.seed)
    abstract = jax.eval_shape(init, key)
    state_sharding = sharding.named(mesh, sharding.state_specs(abstract, family))
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)
    if meta is not None:
      # Restoring onto this run's mesh works whatever mesh saved the checkpoint.
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sharding)
      saved_opt = _saved_opt_state(meta, config, num_steps, abstract.params)
      restored, state = _restore_newest_intact(workdir, manager, target, saved_opt, mesh,
                                               family, loop.say)
      try:  # a damaged newer step was skipped: that step's meta, not the newest's, goes on
        meta = checkpoint.read_meta(manager, restored)
      except checkpoint.CheckpointDamagedError:
        pass
    else:
      state = jax.jit(init, out_shardings=state_sharding)(key, b_dec=b_dec)
    start = int(state.step)
    if start >= num_steps:
      loop.say(f"{workdir} is complete: {start} steps of {num_steps} trained (raise"
               " config.train.num_tokens to train further).")
      return TrainResult(state=state, metrics=_finished_metrics(workdir), steps=start,
                         workdir=workdir, complete_before=True)
    if jax.process_index() == 0:
      jsonio.write_json(workdir / "config.json", config.to_dict())
      if changes:
        resume.record_history(workdir, "resumed_with_changes", start,
                              changes={k: {"checkpoint": old, "now": new}
                                       for k, (old, new) in changes.items()})
        loop.say(f"resuming step {start} with changed " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            + f" (recorded in {workdir / resume.HISTORY_NAME})")
      elif start:
        loop.say(f"resuming from step {start} of {num_steps} in {workdir}")

    # -- Compile lazily (per capacity); the held-out set; the loop.
    hparams = jax.device_put(hyperparams(config), jax.sharding.NamedSharding(mesh, P()))
    trainee = _OneSAE(
        config, session, state=state, hparams=hparams,
        step_fns=_StepFunctions(settings, optimizer, state_sharding, batch_sharding),
        capacity=_SparseCapacity(config, settings, meta),
        meta=resume.checkpoint_meta(config, session.source),
        held_out=loop.held_out_batches(config, batch_sharding), num_steps=num_steps)
    end = loop.run_steps(trainee, session, config, start=start, num_steps=num_steps,
                         batch_sharding=batch_sharding,
                         evaluating=bool(trainee.held_out),
                         progress=progress, desc="train")
  return TrainResult(state=trainee.state, metrics=trainee.metrics, steps=end.done,
                     workdir=workdir, preempted=end.preempted, stop_reason=end.stop_reason,
                     warnings=trainee.warnings)


class _StepFunctions:
  """The jitted train steps, one per (with_metrics, sparse capacity), compiled on first use."""

  def __init__(self, settings: StepSettings, optimizer, state_sharding, batch_sharding):
    self._settings, self._optimizer = settings, optimizer
    self._shardings = (state_sharding, batch_sharding)
    self._compiled: dict = {}

  def __call__(self, with_metrics: bool, capacity: int):
    key = (with_metrics, capacity)
    if key not in self._compiled:
      settings = self._settings
      family = saes.get(settings.family)
      settings = dataclasses.replace(
          settings, loss=family.with_step_capacity(settings.loss, capacity))
      state_sharding, batch_sharding = self._shardings
      self._compiled[key] = jax.jit(
          functools.partial(train_step, settings=settings, optimizer=self._optimizer,
                            with_metrics=with_metrics),
          in_shardings=(state_sharding, batch_sharding, None),
          out_shardings=(state_sharding, None), donate_argnums=0)
    return self._compiled[key]


class _SparseCapacity:
  """The sparse step's capacity during a run (0: dense).

  Fixed unless the family adapts it (`adapts_capacity`: JumpReLU with
  `sae.sparse_capacity=-1`, on CPU); then each logging step's `max_candidates` re-picks it
  (`ops.sparse.adapt_capacity`). A function of the logged batches alone, and saved
  in each checkpoint's meta, so a resumed run picks the same capacities as an
  unbroken one (the capacity changes the summation order, not the result beyond
  float rounding).
  """

  META_KEY = "step_capacity"  # in checkpoint meta and the metrics log

  def __init__(self, config, settings: StepSettings, meta: dict | None):
    # Only where the sparse step was measured to pay (`ops.sparse.MEASURED_BACKENDS`);
    # elsewhere `-1` is the dense step, as the family's rule says there.
    self.adaptive = (saes.get(config.sae.family).adapts_capacity(config)
                     and jax.default_backend() in sparse.MEASURED_BACKENDS)
    self.now = saes.get(settings.family).step_capacity(settings.loss)
    if self.adaptive and meta is not None and self.META_KEY in meta:
      self.now = int(meta[self.META_KEY])
    self._d_sae = int(config.sae.d_sae)

  def observe(self, metrics: dict) -> None:
    """Logs the capacity the step ran with and, if adaptive, picks the next one."""
    if self.adaptive:
      metrics[self.META_KEY] = float(self.now)
      self.now = sparse.adapt_capacity(self.now, metrics["max_candidates"], self._d_sae)

  def record(self, meta: dict) -> dict:
    """`meta` with the capacity the next step runs with (what a resume continues from)."""
    return dict(meta, **{self.META_KEY: self.now}) if self.adaptive else meta


def optim_lr(config, num_steps: int, step: int) -> float:
  """The learning rate used at `step` (for logging)."""
  o = config.optim
  return float(optim.lr_schedule(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=num_steps,
                                 decay=o.decay, decay_start_frac=o.decay_start_frac,
                                 final_lr_frac=o.final_lr_frac)(step))

