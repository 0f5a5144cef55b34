"""TopK + AuxK on tiny.py's planted features (best cosine ~0.99, L0 = k = 6).

  jsae train --config=configs/tiny_topk.py --workdir=/tmp/jsae_tiny_topk
  jsae export /tmp/jsae_tiny_topk /tmp/jsae_tiny_topk_saelens --format=saelens
"""

from configs import tiny


def get_config(arg: str | None = None):
  """configs/tiny.py for the topk family, tuned on its planted features."""
  del arg
  c = tiny.get_config("family=topk")
  c.sae.k = 6  # the planted L0
  c.sae.k_aux = 32  # d_in / 2 (dictionary_learning's heuristic); 512 would sort whole rows
  return c
