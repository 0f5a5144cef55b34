"""Training recipes: where a run's initial threshold, bandwidth, warm-ups and learning rate
come from (`config.recipe`).

  'gemma_scope'  the config's values as written. The defaults are Gemma Scope's
                 (JumpReLU theta_0 = eps = 0.001, lr 7e-5, warm-ups of 1,000 and 10,000
                 steps), written for runs of about a million steps.
  'auto'         derived from the data at init and from the budget, for the short runs
                 (10^2 to 10^5 steps) where Gemma Scope's values barely move:
    the family's own fields (`Family.auto_fields`, from the fresh encoder's
                 pre-activations on the first batch; JumpReLU: theta_0 so that 20% of
                 them fire, the bandwidth so that the straight-through window holds
                 half of them, lambda's warm-up at 5% of the run);
    lr           LR_REF x sqrt(D_SAE_REF / d_sae) x sqrt(batch / BATCH_REF): Adam's
                 step for wider dictionaries falls as 1/sqrt(width) (Gao et al. 2024),
                 and grows as sqrt(batch) with the gradient's lower noise;
    lr warm-up   LR_WARMUP of the run's steps.

`derive` gives those values for a config and its initial pre-activations, and `apply`
writes them in (the run's config.json records them). A field the recipe derives that is
also set by hand (differs from its Gemma Scope value) wins: the recipe derives the rest,
and the log line says which values were kept.
"""

from __future__ import annotations

import copy
import math

import ml_collections
import numpy as np

from jsae import saes

RECIPES = ("gemma_scope", "auto")

LR_WARMUP = 0.0125  # lr warm-up, as a share of the run's steps
LR_REF, D_SAE_REF, BATCH_REF = 2e-3, 256, 512  # lr measured best at this width and batch
# The fields 'auto' derives for every family, with their Gemma Scope values.
COMMON_FIELDS = {"optim.lr": 7e-5, "optim.warmup_steps": 1000}
# Rows of pre-activations read at most (their count times d_sae caps the sample).
MAX_SAMPLE = 1 << 22


class RecipeError(ValueError):
  """`config.recipe` cannot apply to this config; the message names the fields."""


def get_field(config, dotted: str):
  """config[group][name] for dotted 'group.name'."""
  group, name = dotted.split(".")
  return config[group][name]


def auto_fields(family_name: str) -> dict:
  """{'group.field': Gemma Scope value} of what 'auto' derives for the family (its own
  fields' defaults, and COMMON_FIELDS)."""
  family = saes.get(family_name)
  defaults = saes.base.field_defaults(family_name)
  own = {}
  for dotted in family.auto_fields:
    group, name = dotted.split(".")
    own[dotted] = defaults[group][name]
  return {**own, **COMMON_FIELDS}


def check(config: ml_collections.ConfigDict) -> None:
  """Raises RecipeError for an unknown recipe, or 'auto' on a family without one."""
  name = config.get("recipe", "gemma_scope")
  if name not in RECIPES:
    raise RecipeError(f"config.recipe: {name!r} is not one of {RECIPES}.")
  family = saes.get(config.sae.family)
  if name == "auto" and not family.auto_fields:
    able = [n for n in saes.names() if saes.get(n).auto_fields]
    raise RecipeError(
        f"config.recipe: 'auto' derives a threshold and a straight-through window, which"
        f" family {family.name!r} does not have (families with a recipe 'auto':"
        f" {', '.join(able)}). Set config.recipe='gemma_scope' and the fields by hand.")


def set_by_hand(config: ml_collections.ConfigDict) -> dict:
  """{'group.field': value} of the fields 'auto' derives that the config sets to other
  than their Gemma Scope value: those win over the recipe."""
  return {k: get_field(config, k) for k, v in auto_fields(config.sae.family).items()
          if not math.isclose(get_field(config, k), v)}


def sample_rows(d_sae: int, available: int) -> int:
  """Rows of pre-activations to sample: all `available`, capped so that rows x d_sae <=
  MAX_SAMPLE (at least 16)."""
  return int(min(available, max(16, MAX_SAMPLE // d_sae)))


def learning_rate(d_sae: int, batch_size: int) -> float:
  """Adam's peak lr for this width and global batch (see the module docstring)."""
  return LR_REF * math.sqrt(D_SAE_REF / d_sae) * math.sqrt(batch_size / BATCH_REF)


def derive(config: ml_collections.ConfigDict, pre: np.ndarray, num_steps: int) -> dict:
  """{'group.field': value} of 'auto' for this config, its initial pre-activations `pre`
  (`[rows, d_sae]`, normalised units) and its steps; fields `set_by_hand` keep their
  values."""
  values = {
      **saes.get(config.sae.family).auto_values(pre, num_steps),
      "optim.lr": learning_rate(config.sae.d_sae, config.data.batch_size),
      "optim.warmup_steps": int(round(LR_WARMUP * num_steps)),
  }
  return {**values, **set_by_hand(config)}


def apply(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with `values` ('group.field': value) written in."""
  out = copy.deepcopy(config)
  for dotted, value in values.items():
    group, name = dotted.split(".")
    out[group][name] = value
  return out


def describe(values: dict, hand: dict) -> str:
  """One line for the log: what 'auto' derived, and which values set by hand it kept."""
  line = "recipe auto: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()
                                     if k not in hand)
  if hand:
    line += "; set by hand, kept: " + ", ".join(f"{k}={v!r}" for k, v in hand.items())
  return line
