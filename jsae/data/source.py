"""The contract between activation data and the trainer.

Every training source serves the batch for step ``t`` as a pure function of
``(seed, t)``: there is no iterator state to checkpoint, so a run restarted at
step ``t`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ActivationSource(Protocol):
  """A stream of activation rows indexed by training step.

  Attributes:
    d_in: width of one activation row.
    batch_size: rows in one *global* batch (all hosts together).
    norm_scale: the constant C; training divides rows by C so E||x/C||^2 = 1.
    d_out: a transcoder's target width: each row is then [x, y], d_in + d_out wide
      (0, or absent: an SAE's data, rows are x).
    target_norm_scale: C of the target y (None, or absent, for an SAE's data).
  """

  d_in: int
  batch_size: int
  norm_scale: float

  def batch(self, step: int) -> np.ndarray:
    """Rows this process contributes to the global batch of ``step``.

    Returns:
      ``[batch_size // jax.process_count(), d_in (+ d_out)]`` float32 (or bfloat16)
      rows in the LM's own units (not yet divided by ``norm_scale``).
    """
    ...

  def close(self) -> None:
    """Releases threads and file handles."""
    ...
