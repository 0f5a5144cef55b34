"""Reading a training run directory: a params-only restore and the run's provenance.

    run = jsae.runs.read_run("runs/my_sae")      # latest finished checkpoint
    run.params, run.family_state, run.norm_scale, run.provenance
    sae = jsae.runs.read_sae("runs/my_sae")      # the same, folded: a jsae.SAE

The optimizer state is never read: the checkpoint's own config rebuilds the
family's parameter shapes abstractly (`jax.eval_shape` of `init`) and Orbax
restores just `params` (and the family state, e.g. BatchTopK's threshold).
Nothing here imports the trainer, so the SAE object and the formats can read
runs without import circles.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jsae import checkpoint, saes
from jsae.sae import SAE


class RunError(ValueError):
  """A run directory holds something jsae cannot read (the message names it and the fix)."""


@dataclasses.dataclass
class Run:
  """One checkpoint of a training run.

  Attributes:
    workdir: the run directory.
    step: the checkpoint's step.
    config: the run's config (from the checkpoint).
    meta: the checkpoint's meta item (shapes, norm_scale, data fingerprint, ...).
    params: the family's training-time parameters (host-local arrays).
    family_state: the family state (`NoState()` for families that keep none).
    provenance: what the run knows about its activations and training.
  """

  workdir: Path
  step: int
  config: ml_collections.ConfigDict
  meta: dict
  params: Any
  family_state: Any
  provenance: dict

  @property
  def norm_scale(self) -> float:
    """C, the constant the training inputs were divided by."""
    return float(self.meta["norm_scale"])

  @property
  def norm_scales(self):
    """What `SAE.from_training` folds with: C, or a transcoder's (C of x, C of y)."""
    target = self.meta.get("target_norm_scale")
    return self.norm_scale if target is None else (self.norm_scale, float(target))


def _checked_dir(workdir) -> Path:
  workdir = Path(workdir).expanduser().absolute()
  if not workdir.is_dir():
    raise FileNotFoundError(f"{workdir}: no such run directory; pass the --workdir of a"
                            " `jsae train` run.")
  if not (workdir / "checkpoints").is_dir():
    raise FileNotFoundError(f"{workdir / 'checkpoints'}: missing; {workdir} is not a jsae"
                            " run directory (expected config.json and checkpoints/ from"
                            " `jsae train`).")
  return workdir


def read_run(workdir: str | os.PathLike, *, step: int | None = None,
             say=None) -> Run:
  """The params (and family state) of a run's latest (or `step`'s) finished checkpoint.

  Without `step`, a damaged newest checkpoint (truncated files) is skipped for
  the newest intact one, and `say` (default: print to stderr) is told so.

  Raises:
    FileNotFoundError: not a run directory, or no finished checkpoint (or not `step`).
    CheckpointDamagedError: `step` (or every checkpoint) cannot be read.
    RunError: the checkpoint names a family this jsae does not know.
  """
  workdir = _checked_dir(workdir)
  ckpt_dir = workdir / "checkpoints"
  say = say or (lambda message: print(f"[jsae] {message}", file=sys.stderr))
  manager = checkpoint.make_manager(workdir, async_save=False)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(
          f"{ckpt_dir}: no finished checkpoint. Training writes one every"
          " config.ckpt.every_steps steps and at the end; train longer, or wait for the"
          " first checkpoint to finish.")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"{ckpt_dir}: no finished checkpoint at step {step};"
                              f" available steps: {steps}.")
    read = functools.partial(_read_step, manager, ckpt_dir)
    if step is None:
      step, (meta, config, restored, family_state) = checkpoint.newest_intact(
          manager, read, say=say)
    else:
      try:
        meta, config, restored, family_state = read(step)
      except checkpoint.CheckpointDamagedError as e:
        others = [s for s in steps if s != step]
        if others:
          raise RunError(f"{e}; pick another step with --step (available: {others}).") from e
        raise
  finally:
    manager.close()
  provenance = run_provenance(workdir, config, meta, step)
  return Run(workdir=workdir, step=step, config=config, meta=meta,
             params=restored["params"], family_state=family_state, provenance=provenance)


def _read_step(manager, ckpt_dir: Path, step: int):
  """(meta, config, {'params', ['family_state']}, family_state) of one checkpoint step."""
  meta = checkpoint.read_meta(manager, step)
  config = ml_collections.ConfigDict(meta["config"])
  name = meta.get("family", config.sae.family)
  if name not in saes.names():
    raise RunError(f"{ckpt_dir}: meta key 'family' is {name!r}; this jsae knows"
                   f" {saes.names()} (upgrade jsae to read this run).")
  family = saes.get(name)
  # A field added after this run was saved reads as its default.
  config = saes.base.fill_missing_fields(config)
  abstract = jax.eval_shape(lambda key: _init(family, key, config), jax.random.key(0))
  # Host-local arrays on one device, whatever mesh saved the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract)
  wanted = {"params": abstract[0]}
  if jax.tree.leaves(abstract[1]):
    wanted["family_state"] = abstract[1]
  restored = checkpoint.restore_fields(manager, step, wanted)
  return meta, config, restored, restored.get("family_state", abstract[1])


def is_run_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a training run's workdir (config.json and checkpoints/)."""
  path = Path(path).expanduser()
  return (path / "checkpoints").is_dir() and (path / "config.json").is_file()


def read_sae(workdir: str | os.PathLike, *, step: int | None = None,
             fold_decoder_norm: bool | None = None, say=None) -> SAE:
  """The SAE of a run directory's latest (or `step`'s) checkpoint, folded to raw units.

  Args:
    workdir: a directory `jsae train` wrote (config.json, checkpoints/), or a
      sweep member's directory.
    step: checkpoint step; default the newest intact one.
    fold_decoder_norm: fold decoder row norms; default True exactly when the
      run did not keep decoder rows at unit norm (`config.optim.decoder_unit_norm`)
      and the inference family allows it (`Family.folds_decoder_norms`).
    say: where a skipped damaged checkpoint is reported (default stderr).

  Raises:
    FileNotFoundError: no checkpoints/ folder or no finished checkpoint in it.
  """
  run = read_run(workdir, step=step, say=say)
  if fold_decoder_norm is None:
    form = saes.get(saes.get(run.config.sae.family).inference_form)
    fold_decoder_norm = not run.config.optim.decoder_unit_norm and form.folds_decoder_norms
  return SAE.from_training(run.params, run.norm_scales, run.provenance,
                           state=run.family_state, fold_decoder_norm=fold_decoder_norm,
                           transcoder=saes.base.is_transcoder(run.config))


def training_family(workdir: str | os.PathLike) -> str | None:
  """The family a run directory trained, from its config.json (None if unreadable)."""
  try:
    return json.loads((Path(workdir).expanduser() / "config.json").read_text())["sae"]["family"]
  except (OSError, ValueError, KeyError, TypeError):
    return None


def training_transcoder(workdir: str | os.PathLike) -> tuple[bool, bool]:
  """(whether a run directory trains a transcoder, whether with an affine skip), from its
  config.json ((False, False) if unreadable: `read_sae` then says why)."""
  try:
    sae = json.loads((Path(workdir).expanduser() / "config.json").read_text())["sae"]
    return bool(sae.get("target_site")), bool(sae.get("target_site") and sae.get("skip"))
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return False, False


def _init(family: saes.Family, key, config):
  params = family.init(key, d_in=config.sae.d_in, d_sae=config.sae.d_sae,
                       **family.init_kwargs(config))
  return params, family.init_state(config.sae.d_sae, family.settings(config))


def run_provenance(workdir: Path, config, meta: dict, step: int) -> dict:
  """What a run knows about its activations and training, as a JSON-able dict."""
  family = saes.get(config.sae.family)
  knobs = {n.split(".", 1)[1]: config[n.split(".")[0]][n.split(".")[1]]
           for n in family.traced_names()}
  prov: dict[str, Any] = dict(
      source_format="jsae_run", run_dir=str(workdir), step=step,
      norm_scale=float(meta["norm_scale"]), data_source=config.data.source,
      training_family=family.name, hyperparameters=knobs,
      tokens=step * int(config.data.batch_size))
  if saes.base.is_transcoder(config):
    prov.update(target_site=config.sae.target_site, skip=bool(config.sae.get("skip", False)))
  knob = family.knob_value(config)
  if knob is not None:  # the sparsity knob under its field name (sparsity_coeff, k)
    prov[family.knob.split(".")[1]] = knob[1]
  target = family.l0_target(config)
  if target is not None:  # lambda was steered to this L0 from there
    prov["l0_target"] = target
  if config.data.source == "shards":
    prov["shards_dir"] = str(config.data.shards_dir)
    try:
      from jsae.data import shards  # pylint: disable=import-outside-toplevel
      manifest = shards.load_manifest(config.data.shards_dir)
      prov.update({k: v for k, v in manifest.provenance.to_dict().items()
                   if v not in (None, "", [], {})})
    except Exception as e:  # the shards may have moved; the SAE is still usable
      prov["provenance_error"] = (f"could not read the shard manifest in"
                                  f" {config.data.shards_dir}: {e}")
  elif config.data.source == "synthetic":
    prov["model"] = "synthetic"
    prov["synthetic"] = config.data.synthetic.to_dict()
  return prov


__all__ = ["Run", "RunError", "is_run_dir", "read_run", "read_sae", "run_provenance", "training_family"]
