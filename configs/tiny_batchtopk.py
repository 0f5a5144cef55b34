"""BatchTopK + AuxK on tiny.py's planted features (best cosine ~0.97; inference L0 ~6.0).

  jsae train --config=configs/tiny_batchtopk.py --workdir=/tmp/jsae_tiny_batchtopk
  jsae export /tmp/jsae_tiny_batchtopk /tmp/jsae_tiny_batchtopk_saelens --format=saelens
"""

from configs import tiny


def get_config(arg: str | None = None):
  """configs/tiny.py for the batchtopk family, tuned on its planted features."""
  del arg
  c = tiny.get_config("family=batchtopk")
  c.sae.k = 6  # the planted L0 (a batch mean)
  c.sae.k_aux = 32  # d_in / 2 (dictionary_learning's heuristic); 512 would sort whole rows
  return c
