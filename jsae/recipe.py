"""Training recipes: where a JumpReLU run's bandwidth, initial threshold, warm-ups and
learning rate come from (`config.recipe`).

  'gemma_scope'  the config's values as written. The defaults are Gemma Scope's
                 (theta_0 = eps = 0.001, lr 7e-5, warm-ups of 1,000 and 10,000 steps),
                 written for runs of about a million steps.
  'auto'         derived from the data at init and from the budget, for the short runs
                 (10^2 to 10^5 steps) where Gemma Scope's values barely move:
    theta_0      the (1 - INIT_FIRING) quantile of the initial pre-activations pi(x), so
                 that INIT_FIRING of them fire at step 0;
    bandwidth    eps = 2 x the WINDOW quantile of |pi - theta_0|: the straight-through
                 window [theta_0 - eps/2, theta_0 + eps/2] holds WINDOW of them;
    warm-ups     LR_WARMUP and SPARSITY_WARMUP of the run's steps;
    lr           LR_REF x sqrt(D_SAE_REF / d_sae) x sqrt(batch / BATCH_REF): Adam's
                 step for wider dictionaries falls as 1/sqrt(width) (Gao et al. 2024),
                 and grows as sqrt(batch) with the gradient's lower noise.
  The constants were measured on planted features and Gemma 3 270M activations
  (README, "The recipe and its knobs").

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

RECIPES = ("gemma_scope", "auto")
FAMILIES = ("jumprelu",)  # the families 'auto' knows how to derive

INIT_FIRING = 0.2  # share of the initial pre-activations above theta_0
WINDOW = 0.5  # share of them inside the initial straight-through window
LR_WARMUP = 0.0125  # lr warm-up, as a share of the run's steps
SPARSITY_WARMUP = 0.05  # lambda warm-up, as a share of the run's steps
LR_REF, D_SAE_REF, BATCH_REF = 2e-3, 256, 512  # lr measured best at this width and batch

# The fields 'auto' derives, with the Gemma Scope values it expects to find there.
GEMMA_SCOPE = {
    "sae.init_threshold": 0.001,
    "sae.bandwidth": 0.001,
    "optim.lr": 7e-5,
    "optim.warmup_steps": 1000,
    "loss.sparsity_warmup_steps": 10_000,
}
# Rows of pre-activations read at most (their count times d_sae caps the sample).
MAX_SAMPLE = 1 << 22


class RecipeError(ValueError):
  """`config.recipe` cannot apply to this config; the message names the fields."""


def get_field(config, dotted: str):
  """config[group][name] for dotted 'group.name'."""
  group, name = dotted.split(".")
  return config[group][name]


def check(config: ml_collections.ConfigDict) -> None:
  """Raises RecipeError for an unknown recipe, or 'auto' on a family it cannot derive."""
  name = config.get("recipe", "gemma_scope")
  if name not in RECIPES:
    raise RecipeError(f"config.recipe: {name!r} is not one of {RECIPES}.")
  if name == "auto" and config.sae.family not in FAMILIES:
    raise RecipeError(
        f"config.recipe: 'auto' derives JumpReLU's bandwidth and threshold; family"
        f" {config.sae.family!r} has neither. Set config.recipe='gemma_scope' and the"
        " fields by hand.")


def set_by_hand(config: ml_collections.ConfigDict) -> dict:
  """{'group.field': value} of the fields 'auto' derives that the config sets to other
  than their Gemma Scope value: those win over the recipe."""
  return {k: get_field(config, k) for k, v in GEMMA_SCOPE.items()
          if not math.isclose(get_field(config, k), v)}


def sample_rows(d_sae: int, available: int) -> int:
  """Rows of pre-activations to sample: all `available`, capped so that rows x d_sae <=
  MAX_SAMPLE (at least 16)."""
  return int(min(available, max(16, MAX_SAMPLE // d_sae)))


def initial_threshold(pre: np.ndarray) -> float:
  """theta_0: the (1 - INIT_FIRING) quantile of `pre` (any shape), at least 1e-6 (theta
  must be positive)."""
  return max(float(np.quantile(np.asarray(pre, np.float64), 1 - INIT_FIRING)), 1e-6)


def window_bandwidth(pre: np.ndarray, theta0: float) -> float:
  """eps such that [theta0 - eps/2, theta0 + eps/2] holds WINDOW of `pre`: twice the
  WINDOW quantile of |pre - theta0| (at least 1e-6)."""
  spread = np.abs(np.asarray(pre, np.float64) - theta0)
  return max(2 * float(np.quantile(spread, WINDOW)), 1e-6)


def learning_rate(d_sae: int, batch_size: int) -> float:
  """Adam's peak lr for this width and global batch (see the module docstring)."""
  return LR_REF * math.sqrt(D_SAE_REF / d_sae) * math.sqrt(batch_size / BATCH_REF)


def derive(config: ml_collections.ConfigDict, pre: np.ndarray, num_steps: int) -> dict:
  """{'group.field': value} of 'auto' for this config, its initial pre-activations `pre`
  (`[rows, d_sae]`, normalised units) and its steps; fields `set_by_hand` keep their
  values."""
  theta0 = initial_threshold(pre)
  values = {
      "sae.init_threshold": theta0,
      "sae.bandwidth": window_bandwidth(pre, theta0),
      "optim.lr": learning_rate(config.sae.d_sae, config.data.batch_size),
      "optim.warmup_steps": int(round(LR_WARMUP * num_steps)),
      "loss.sparsity_warmup_steps": int(round(SPARSITY_WARMUP * num_steps)),
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
  """One line for the log: what 'auto' chose, and which values set by hand it kept."""
  derived = {
      "sae.init_threshold": f"theta_0 {values['sae.init_threshold']:.4g} ({INIT_FIRING:.0%}"
                            " of the initial pre-activations fire)",
      "sae.bandwidth": f"bandwidth {values['sae.bandwidth']:.4g} (the window holds"
                       f" {WINDOW:.0%})",
      "optim.lr": f"lr {values['optim.lr']:.3g}",
      "optim.warmup_steps": f"lr warm-up {values['optim.warmup_steps']} steps",
      "loss.sparsity_warmup_steps": f"lambda warm-up {values['loss.sparsity_warmup_steps']}"
                                    " steps",
  }
  line = "recipe auto: " + ", ".join(v for k, v in derived.items() if k not in hand)
  if hand:
    line += "; set by hand, kept: " + ", ".join(f"{k}={v!r}" for k, v in hand.items())
  return line
