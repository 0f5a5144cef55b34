"""A seconds-long sweep on tiny.py's planted features: every family, three points each.

  jsae sweep --config=configs/sweep_tiny.py --workdir=/tmp/jsae_sweep_tiny
  jsae sweep --config=configs/sweep_tiny.py:families=jumprelu+topk --workdir=...

Each family's group holds its configs/tiny_<family>.py settings and sweeps its
sparsity knob (lambda or k) around the planted L0 of 6; all members read each
batch once.
"""

import importlib

from configs import default, tiny
from jsae import sweep

# The knob each family sweeps around the planted L0 (6), from sparse to dense.
KNOBS = {
    "jumprelu": {"sparsity_coeff": (0.04, 0.02, 0.01)},
    "relu": {"sparsity_coeff": (1.2, 0.6, 0.3)},
    "topk": {"k": (4, 6, 9)},
    "batchtopk": {"k": (4, 6, 9)},
    "matryoshka": {"k": (4, 6, 9)},
    "gated": {"sparsity_coeff": (1.2, 0.6, 0.3)},
}


def get_config(arg: str | None = None):
  """tiny.py's shared fields and one group per family ('families=a+b' picks some)."""
  args = default.parse_arg(arg)
  families = args.get("families", "+".join(KNOBS)).split("+")
  unknown = sorted(set(families) - set(KNOBS))
  if unknown:
    raise ValueError(f"families={'+'.join(unknown)}: not in {sorted(KNOBS)}.")
  groups = {}
  for name in families:
    module = importlib.import_module(f"configs.tiny_{name}")
    groups[name] = sweep.group(module.get_config(), KNOBS[name])
  c = sweep.sweep_config(tiny.get_config(), groups)
  c.train.num_tokens = 1000 * 512
  return c
