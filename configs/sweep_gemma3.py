"""The paper's family comparison at small scale: Gemma 3 270M, one site, five families.

  jsae harvest --config=configs/demo.py --workdir=runs/acts               # shards of the site
  jsae sweep --config=configs/sweep_gemma3.py --workdir=runs/sweep_gemma3
  jsae eval --config=configs/demo.py --workdir=runs/acts --sae=runs/sweep_gemma3

Other sites: `:site=mlp_out.6` or `:site=attn_z.6` here and `--config.lm.site=...`
on harvest and eval (docs/results.md has every command). The held-out split harvested
beside `shards=` (its `train/` replaced by `eval/`, or `eval_shards=DIR`) gives the
held-out FVU and L0 every 100 steps. Each family's group holds
configs/demo.py's settings for it (2048 latents, batch 1024) and sweeps its sparsity
knob so that L0 spans about 10 to 200; `seed` repeats of a middle point show the noise.
With `targets=1` the lambda families (JumpReLU, ReLU, Gated) sweep a target L0 instead,
reached by the lambda controller (loss.l0_control), at the TopK kinds' k: every family's
members then sit at the same L0s. All members read each batch once.
"""

from configs import default, demo
from jsae import evals, sweep
from jsae.lm import gemma

# From sparse to dense; lambda values are for inputs scaled to E||x||^2 = 1.
KNOBS = {
    "jumprelu": {"sparsity_coeff": (2e-3, 5e-4, 1.5e-4, 5e-4), "seed": (0, 0, 0, 1)},
    "relu": {"sparsity_coeff": (0.3, 0.1, 0.03)},
    "gated": {"sparsity_coeff": (0.3, 0.1, 0.03)},
    "topk": {"k": (12, 40, 128, 40), "seed": (0, 0, 0, 1)},
    "batchtopk": {"k": (12, 40, 128)},
}
# targets=1: the lambda families' target L0s, the TopK kinds' k (JumpReLU's seed repeat too).
TARGETS = {
    "jumprelu": {"target_l0": (12.0, 40.0, 128.0, 40.0), "seed": (0, 0, 0, 1)},
    "relu": {"target_l0": (12.0, 40.0, 128.0)},
    "gated": {"target_l0": (12.0, 40.0, 128.0)},
}


def _family_config(family: str, site: str, shards_dir: str, eval_shards_dir: str,
                   targets: bool = False):
  c = demo.get_config(f"family={family}")
  if targets and family in TARGETS:
    c.loss.l0_control = True
  c.lm.site = site
  c.sae.d_in = evals.site_width(gemma.get_config(c.lm.model), site)
  c.sae.d_sae = 2048
  c.data.shards_dir = shards_dir
  c.data.eval_shards_dir = eval_shards_dir  # held-out FVU / L0 every eval.every_steps
  c.train.num_tokens = 300 * 1024  # ~1.2 epochs over the harvested tokens
  c.optim.warmup_steps = 50
  if "sparsity_warmup_steps" in c.loss:
    c.loss.sparsity_warmup_steps = 100
  c.loss.dead_window_steps = 250
  c.eval.every_steps = 100
  return c


def get_config(arg: str | None = None):
  """One group per family on config `site` (default resid_post.6); 'families=a+b' picks some."""
  args = default.parse_arg(arg)
  unknown_args = sorted(set(args) - {"site", "shards", "eval_shards", "families", "targets"})
  if unknown_args:
    raise ValueError(f"unknown config argument(s) {unknown_args}; configs/sweep_gemma3.py takes"
                     " site=SITE, shards=DIR, eval_shards=DIR, families=a+b and targets=1.")
  targets = args.get("targets", "0") not in ("0", "")
  site = args.get("site", "resid_post.6")
  shards_dir = args.get("shards", f"runs/acts/activations/train/{site}")
  # `jsae harvest` writes the held-out split beside the training one.
  eval_shards_dir = args.get("eval_shards", shards_dir.replace("/train/", "/eval/")
                             if "/train/" in shards_dir else "")
  families = args.get("families", "+".join(KNOBS)).split("+")
  unknown = sorted(set(families) - set(KNOBS))
  if unknown:
    raise ValueError(f"families={'+'.join(unknown)}: not in {sorted(KNOBS)}.")
  knobs = {**KNOBS, **TARGETS} if targets else KNOBS
  groups = {name: sweep.group(_family_config(name, site, shards_dir, eval_shards_dir, targets),
                              knobs[name], mode="zip") for name in families}
  return sweep.sweep_config(_family_config("jumprelu", site, shards_dir, eval_shards_dir),
                            groups)
