"""JumpReLU on the planted features of configs/tiny.py (mean best cosine ~0.98, L0 ~5.3 of 6).

  jsae train --config=configs/tiny_jumprelu.py --workdir=/tmp/jsae_tiny_jumprelu
  jsae export /tmp/jsae_tiny_jumprelu /tmp/jsae_tiny_jumprelu_saelens --format=saelens
"""

from configs import tiny


def get_config(arg: str | None = None):
  """configs/tiny.py for the jumprelu family, tuned on its planted features."""
  del arg
  c = tiny.get_config("family=jumprelu")
  # tiny.py's JumpReLU settings: recipe 'auto', lambda 0.02.
  return c
