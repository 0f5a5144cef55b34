"""Config validation and derived quantities, checked once at the boundary."""

from __future__ import annotations

import re

import ml_collections

from jsae import recipe, saes


class ConfigError(ValueError):
  """A config field has a value jsae cannot use; the message names field and fix."""


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


_CHOICES = {
    "sae.compute_dtype": ("float32", "bfloat16"),
    "sae.init_b_dec": ("zeros", "mean"),
    "optim.decay": ("none", "linear", "cosine"),
    "data.source": ("synthetic", "shards"),
    "data.verify": ("first_open", "all", "none"),
}


def _get(config, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the field and the fix for any unusable value.

  The family checks its own fields (`Family.validate`): a field of another
  family, a missing one, or a value out of range.
  """
  _require(config.sae.family in saes.names(), "sae.family",
           f"unknown family {config.sae.family!r}; known: {saes.names()}. Build the config"
           " with --config=configs/default.py:family=NAME.")
  try:
    saes.get(config.sae.family).validate(config)
  except saes.FamilyConfigError as e:
    raise ConfigError(str(e)) from None
  try:
    recipe.check(config)
  except recipe.RecipeError as e:
    raise ConfigError(str(e)) from None
  for field, choices in _CHOICES.items():
    value = _get(config, field)
    _require(value in choices, field, f"{value!r} is not one of {choices}.")
  for field in ("sae.d_in", "sae.d_sae", "data.batch_size", "train.num_tokens",
                "train.log_every", "ckpt.every_steps", "ckpt.max_to_keep"):
    value = _get(config, field)
    _require(isinstance(value, int) and value > 0, field,
             f"must be a positive integer; got {value!r}.")
  lm_mesh = config.get("lm", {}).get("mesh", None)
  if lm_mesh is not None:
    for axis, lowest in (("data", -1), ("model", 0)):
      value = lm_mesh.get(axis, 0)
      _require(isinstance(value, int) and value >= lowest, f"lm.mesh.{axis}",
               f"must be an integer >= {lowest} (0: auto); got {value!r}.")
  _require(config.optim.lr > 0, "optim.lr", f"must be > 0; got {config.optim.lr!r}.")
  _require(isinstance(config.eval.lm_contexts, int) and config.eval.lm_contexts >= 1,
           "eval.lm_contexts", "must be a positive integer (held-out contexts for delta LM"
           f" loss); got {config.eval.lm_contexts!r}.")
  _require(config.eval.get("unembed_dtype", "auto") in ("auto", "float32", "bfloat16"),
           "eval.unembed_dtype", "must be 'auto', 'float32' or 'bfloat16'; got"
           f" {config.eval.get('unembed_dtype')!r}.")
  release = config.eval.get("saebench_release", "jsae")
  _require(isinstance(release, str) and bool(re.fullmatch(r"[\w.\-]+", release)),
           "eval.saebench_release", "names SAEBench's files: letters, digits, '_', '.' and"
           f" '-' only; got {release!r}.")
  _require(isinstance(config.eval.memory_mb, int) and config.eval.memory_mb > 0,
           "eval.memory_mb", f"must be a positive integer (MiB); got {config.eval.memory_mb!r}.")
  for field in ("optim.clip_grad_norm", "optim.warmup_steps", "eval.batch_size"):
    value = _get(config, field)
    _require(value >= 0, field, f"must be >= 0; got {value!r}.")
  _require(0 <= config.optim.b1 < 1 and 0 < config.optim.b2 < 1, "optim.b1/b2",
           "Adam betas must lie in [0, 1).")
  _require(total_steps(config) >= 1, "train.num_tokens",
           f"{config.train.num_tokens} tokens is less than one batch of"
           f" {config.data.batch_size}.")
  if config.data.source == "shards":
    _require(bool(config.data.shards_dir), "data.shards_dir",
             "set it to a directory written by `jsae harvest` (with manifest.json).")
  _validate_transcoder(config)


def _validate_transcoder(config: ml_collections.ConfigDict) -> None:
  """A transcoder's fields: its output width, its skip, no pre-encoder bias."""
  s = config.sae
  _require(isinstance(s.get("d_out", 0), int) and s.get("d_out", 0) >= 0, "sae.d_out",
           f"must be an integer >= 0 (0: d_in); got {s.get('d_out')!r}.")
  if not saes.base.is_transcoder(config):
    _require(not s.get("skip", False), "sae.skip",
             "an affine skip belongs to a transcoder: set config.sae.target_site to the site"
             " it predicts (e.g. mlp_out.6 with config.lm.site=mlp_in.6), or skip=False.")
    _require(not s.get("d_out", 0) or s.d_out == s.d_in, "sae.d_out",
             f"{s.d_out} differs from d_in={s.d_in}, which only a transcoder can have: set"
             " config.sae.target_site, or d_out=0.")
    return
  _require(not s.pre_encoder_bias, "sae.pre_encoder_bias",
           "a transcoder's b_dec lives in its target's space, so it cannot be subtracted"
           " from its input: set --config.sae.pre_encoder_bias=False.")
  lm_site = config.get("lm", {}).get("site", "") if config.data.source == "shards" else ""
  _require(not lm_site or s.target_site != lm_site, "sae.target_site",
           f"{s.target_site!r} is the input site config.lm.site itself: that is an SAE (clear"
           " target_site), or set the site the decoder predicts.")


def total_steps(config: ml_collections.ConfigDict) -> int:
  """Training steps: the token budget divided by the global batch size."""
  return int(config.train.num_tokens // config.data.batch_size)
