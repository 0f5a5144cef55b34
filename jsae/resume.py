"""Whether a workdir's checkpoint may be resumed by a config, and the run's history.

A run is defined by its SAE's shape, its data and the hyperparameters that
shape the updates (`run_defining`). Resuming under other values would silently
continue a different run, so `check_compatible` refuses, naming the fields,
unless the user allows the change (`jsae train --allow_changes=optim.lr`): the
way to continue a diverged run from its last good checkpoint with a lower
learning rate or gradient clipping. Allowed changes go into WORKDIR/history.jsonl,
one line per resume that changed something, with the step it applied from.
"""

from __future__ import annotations

import json
import time
from typing import Any

from jsae import config as config_lib
from jsae import saes

SHAPE_KEYS = ("family", "d_in", "d_sae", "pre_encoder_bias")

# Fields that may change when a run resumes, besides the groups `run_defining`
# ignores (train length, logging, checkpointing, evaluation, mesh, file paths):
# the matmul dtype and settings read only at initialisation, with the family's own
# init-only and resumable fields (a sparse step's capacity: the same updates,
# computed another way).
RESUMABLE_CHANGES = ("sae.compute_dtype", "sae.init_b_dec", "sae.init_b_dec_batches")

# Groups whose fields `--allow_changes` may name: how the run learns from here on.
# The SAE's shape and family, the data and the seeds define the run itself.
CHANGEABLE_GROUPS = ("optim", "loss")

HISTORY_NAME = "history.jsonl"


def shape_meta(config) -> dict:
  """The SAE shape a checkpoint records: family, d_in, d_sae, pre_encoder_bias."""
  s = config.sae
  return dict(family=s.family, d_in=s.d_in, d_sae=s.d_sae,
              pre_encoder_bias=s.pre_encoder_bias)


def checkpoint_meta(config, source) -> dict:
  """The `meta` item a run's checkpoints carry: shape, data identity (and a transcoder's
  target C), the whole config."""
  return dict(shape_meta(config), norm_scale=source.norm_scale,
              target_norm_scale=getattr(source, "target_norm_scale", None),
              data_fingerprint=getattr(source, "fingerprint", None),
              data_seed=config.data.seed, batch_size=config.data.batch_size,
              config=config.to_dict())


def check_source(config, source, meta: dict | None, ckpt_dir) -> None:
  """Raises ConfigError when `source` does not fit the config or the checkpoint's data."""
  if source.d_in != config.sae.d_in:
    raise config_lib.ConfigError(
        f"config.sae.d_in: the data has rows of width {source.d_in} but the config"
        f" says {config.sae.d_in}; set --config.sae.d_in={source.d_in}.")
  data_out = int(getattr(source, "d_out", 0) or 0)
  if saes.base.is_transcoder(config):
    want = int(config.sae.d_out or config.sae.d_in)
    if data_out != want:
      raise config_lib.ConfigError(
          f"config.sae.d_out: the target site {config.sae.target_site} has width {data_out}"
          f" but the transcoder's decoder is {want} wide"
          + (" (d_out 0 means d_in)" if not config.sae.d_out else "")
          + f"; set --config.sae.d_out={data_out}." if data_out else
          f"config.sae.target_site: {config.sae.target_site!r} makes this a transcoder, but"
          " the data has no target rows (set config.data.target_shards_dir to the target"
          " site's shards, or clear config.sae.target_site to train an SAE).")
  elif data_out:
    raise config_lib.ConfigError(
        "config.sae.target_site: the data serves transcoder pairs but the config trains"
        " an SAE; set config.sae.target_site to the target site.")
  fingerprint = getattr(source, "fingerprint", None)
  if meta is not None and meta.get("data_fingerprint") != fingerprint:
    raise config_lib.ConfigError(
        f"config.data: the checkpoint in {ckpt_dir} was trained on data with"
        f" fingerprint {meta.get('data_fingerprint')!r}, this run reads {fingerprint!r};"
        " resuming on other data would not continue the same run. Use a new --workdir.")


def run_defining(config_dict: dict, resumable: tuple[str, ...] = ()) -> dict:
  """{'group.field': value} of the hyperparameters that define a training run.

  The data files themselves are checked by fingerprint; synthetic data by its
  generator settings here. `resumable` fields (the family's) may differ.
  """
  out = {"seed": config_dict["seed"]} if "seed" in config_dict else {}
  data = config_dict.get("data") or {}
  groups = {"sae": config_dict.get("sae"), "loss": config_dict.get("loss"),
            "optim": config_dict.get("optim"), "data.synthetic": data.get("synthetic")}
  for group, fields in groups.items():
    for k, v in (fields or {}).items():
      if f"{group}.{k}" not in RESUMABLE_CHANGES + tuple(resumable):
        out[f"{group}.{k}"] = v
  out.update({f"data.{k}": data[k] for k in ("source", "batch_size", "seed") if k in data})
  return out


def parse_allow_changes(text: str | None, config) -> tuple[str, ...]:
  """`'optim.lr,optim.clip_grad_norm'` -> the checked field names.

  Raises ConfigError for a field that does not exist or that defines the run's identity.
  """
  names = tuple(n.strip().removeprefix("config.") for n in (text or "").split(",") if n.strip())
  for name in names:
    group, _, key = name.partition(".")
    if group not in config or not key or key not in config[group]:
      raise config_lib.ConfigError(
          f"--allow_changes: {name!r} is not a config field (fields look like optim.lr).")
    if group not in CHANGEABLE_GROUPS:
      raise config_lib.ConfigError(
          f"--allow_changes: {name} defines the run itself (its SAE, data or seed), so a"
          " resumed run cannot change it; only fields of "
          + ", ".join(f"config.{g}" for g in CHANGEABLE_GROUPS)
          + " may change. Use a new --workdir to train with another value.")
  return names


def check_compatible(meta: dict, config, ckpt_dir, *,
                     allow_changes: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
  """Raises ConfigError if the checkpoint in `ckpt_dir` was made for another SAE or run.

  Compares the SAE shape and the hyperparameters that define the run (see
  `run_defining`); fields the checkpoint's config does not have (added to
  jsae after it was written) are not compared. Fields in `allow_changes` may
  differ: they are returned as {field: (checkpoint value, config value)}.
  """
  expected = shape_meta(config)
  diffs = [f"{k}: checkpoint {meta.get(k)!r} vs config {expected[k]!r}"
           for k in SHAPE_KEYS if meta.get(k) != expected[k]]
  resumable = saes.get(config.sae.family).resumable_names()
  saved = run_defining(meta.get("config") or {}, resumable)
  # Through JSON, as the checkpoint's copy went, so tuples compare as lists.
  now = run_defining(json.loads(json.dumps(config.to_dict())), resumable)
  shape_fields = {f"sae.{k}" for k in SHAPE_KEYS}
  changed = {k: (saved[k], now.get(k)) for k in sorted(saved)
             if k not in shape_fields and saved[k] != now.get(k)}
  allowed = {k: v for k, v in changed.items() if k in allow_changes}
  diffs += [f"{k}: checkpoint {old!r} vs config {new!r}" for k, (old, new) in changed.items()
            if k not in allowed]
  if diffs:
    changeable = [d.split(":")[0] for d in diffs
                  if d.split(".")[0] in CHANGEABLE_GROUPS]
    raise config_lib.ConfigError(
        f"the checkpoint in {ckpt_dir} does not match the config ("
        + "; ".join(diffs) + "). Use a new --workdir, or set the config fields"
        " to the checkpoint's values to resume it"
        + (f", or continue this run with the new values: --allow_changes={','.join(changeable)}"
           if changeable else "") + ".")
  return allowed


def record_history(workdir, event: str, step: int, **fields) -> None:
  """Appends one JSON line {event, step, time, **fields} to WORKDIR/history.jsonl."""
  line = json.dumps(dict(event=event, step=int(step),
                         time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields))
  path = workdir / HISTORY_NAME
  text = (path.read_text() if path.exists() else "") + line + "\n"
  path.write_text(text)  # whole-file write: object stores (gs://) cannot append


def read_history(workdir) -> list[dict]:
  """The records of WORKDIR/history.jsonl (empty when the run never changed course)."""
  path = workdir / HISTORY_NAME
  if not path.exists():
    return []
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


__all__ = ["CHANGEABLE_GROUPS", "RESUMABLE_CHANGES", "SHAPE_KEYS", "check_compatible",
           "check_source", "checkpoint_meta", "parse_allow_changes", "read_history",
           "record_history", "run_defining", "shape_meta"]
