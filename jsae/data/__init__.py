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


__all__ = ["ActivationSource", "make_source"]
