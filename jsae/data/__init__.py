"""Activation data: the source contract, synthetic ground truth, shards on disk, text."""

from __future__ import annotations

import jax

from jsae.data.source import ActivationSource


def make_source(config) -> ActivationSource:
  """The training source `config.data.source` names, for this process's rows."""
  d = config.data
  if d.source == "synthetic":
    from jsae.data.synthetic import SyntheticSource
    s = d.synthetic
    return SyntheticSource(
        d_in=config.sae.d_in, batch_size=d.batch_size, seed=d.seed,
        n_features=s.n_features, l0=s.l0, zipf_exponent=s.zipf_exponent,
        noise=s.noise, dictionary_seed=s.dictionary_seed,
        process_index=jax.process_index(), process_count=jax.process_count())
  if d.source == "shards":
    from jsae.data.loader import ShardLoader
    return ShardLoader(
        d.shards_dir, batch_size=d.batch_size, seed=d.seed,
        expected_d_in=config.sae.d_in, process_index=jax.process_index(),
        process_count=jax.process_count(), prefetch=d.prefetch, verify=d.verify)
  raise ValueError(f"config.data.source: unknown source {d.source!r};"
                   " use 'synthetic' or 'shards'.")


def make_eval_source(config) -> ActivationSource | None:
  """Held-out rows for evaluation during training, or None when there are none.

  Synthetic data: the same distribution under another seed. Shards: the
  directory `config.data.eval_shards_dir` (e.g. the eval split of a harvest).
  """
  d = config.data
  if d.source == "synthetic":
    held_out = config.copy_and_resolve_references()
    held_out.data.seed = d.seed + 1_000_003  # a stream training never reads
    return make_source(held_out)
  if d.eval_shards_dir:
    from jsae.data.loader import ShardLoader
    return ShardLoader(
        d.eval_shards_dir, batch_size=d.batch_size, seed=d.seed,
        expected_d_in=config.sae.d_in, process_index=jax.process_index(),
        process_count=jax.process_count(), prefetch=0, verify=d.verify)
  return None


__all__ = ["ActivationSource", "make_source", "make_eval_source"]
