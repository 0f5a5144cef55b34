"""A data source that stops at one step, as a preempted job would (resume tests)."""


class CrashingSource:
  """Wraps a source and raises KeyboardInterrupt when asked for batch `crash_at`."""

  def __init__(self, inner, crash_at):
    self.inner, self.crash_at = inner, crash_at
    self.d_in, self.batch_size, self.norm_scale = inner.d_in, inner.batch_size, inner.norm_scale

  def batch(self, step):
    if step == self.crash_at:
      raise KeyboardInterrupt("simulated preemption")
    return self.inner.batch(step)

  def close(self):
    self.inner.close()
