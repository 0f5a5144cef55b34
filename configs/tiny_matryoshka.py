"""Matryoshka BatchTopK on tiny.py's planted features (best cosine ~0.95, L0 ~6).

  jsae train --config=configs/tiny_matryoshka.py --workdir=/tmp/jsae_tiny_matryoshka
  jsae export /tmp/jsae_tiny_matryoshka /tmp/jsae_tiny_matryoshka_saelens --format=saelens
"""

from configs import tiny


def get_config(arg: str | None = None):
  """configs/tiny.py for the matryoshka family, tuned on its planted features."""
  del arg
  c = tiny.get_config("family=matryoshka")
  c.sae.k = 6
  c.sae.group_sizes = (32, 32, 64, 128)  # nested prefixes of 32, 64, 128, 256 latents
  c.sae.k_aux = 32  # d_in / 2 (dictionary_learning's heuristic); 512 would sort whole rows
  return c
