"""A seconds-long CPU run on planted synthetic features (smoke tests, debugging).

  jsae train --config=configs/tiny.py --workdir=/tmp/jsae_tiny
  jsae train --config=configs/tiny.py:family=topk --workdir=/tmp/jsae_tiny_topk

Per-family settings tuned on these planted features: configs/tiny_<family>.py.
"""

from configs import default


def get_config(arg: str | None = None):
  """default.py shrunk: d_in 64, 256 latents, 128 planted features, 2000 steps (~8 s)."""
  c = default.get_config(arg)
  c.sae.d_in = 64
  c.sae.d_sae = 256
  if c.sae.family == "jumprelu":
    # theta_0 and the bandwidth from the data (jsae.recipe); the lr and warm-ups below
    # are every family's (a sweep's groups share them) and what 'auto' derives at 2M tokens.
    c.recipe = "auto"
    c.loss.sparsity_coeff = 0.02  # recovers the planted features: L0 ~ 5.3 of 6, best cosine ~ 0.98
  if "sparsity_warmup_steps" in c.loss:
    c.loss.sparsity_warmup_steps = 200
  c.loss.dead_window_steps = 100
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.data.batch_size = 512
  c.data.synthetic.n_features = 128
  c.data.synthetic.l0 = 6.0
  c.train.num_tokens = 2000 * 512
  c.train.log_every = 100
  c.ckpt.every_steps = 500
  return c
