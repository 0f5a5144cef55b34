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
    transcoder = bool(config.sae.get("target_site", ""))
    return SyntheticSource(
        d_in=config.sae.d_in, batch_size=d.batch_size, seed=d.seed,
        n_features=s.n_features, l0=s.l0, zipf_exponent=s.zipf_exponent,
        noise=s.noise, dictionary_seed=s.dictionary_seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        d_out=int(config.sae.get("d_out", 0) or config.sae.d_in) if transcoder else 0,
        skip_scale=float(s.get("skip_scale", 0.0)))
  if d.source == "shards":
    return _shards(config, d.shards_dir, d.get("target_shards_dir", ""), prefetch=d.prefetch)
  raise ValueError(f"config.data.source: unknown source {d.source!r};"
                   " use 'synthetic' or 'shards'.")


def _shards(config, shards_dir, target_dir: str, *, prefetch: int) -> ActivationSource:
  """A ShardLoader of `shards_dir`, or for a transcoder a PairLoader of it and its target
  (`target_dir`, or the directory beside it named after `sae.target_site`)."""
  d = config.data
  options = dict(batch_size=d.batch_size, seed=d.seed, expected_d_in=config.sae.d_in,
                 process_index=jax.process_index(), process_count=jax.process_count(),
                 prefetch=prefetch, verify=d.verify)
  target_site = config.sae.get("target_site", "")
  if not target_site:
    from jsae.data.loader import ShardLoader
    return ShardLoader(shards_dir, **options)
  from jsae.data.pairs import PairLoader, target_directory
  d_out = config.sae.get("d_out", 0) or config.sae.d_in
  return PairLoader(shards_dir, target_dir or target_directory(shards_dir, target_site),
                    expected_d_out=d_out, **options)


def make_eval_source(config) -> ActivationSource | None:
  """Held-out rows for evaluation during training, or None when there are none.

  Synthetic data: the same distribution under another seed. Shards: the
  directory `config.data.eval_shards_dir` (e.g. the eval split of a harvest; a
  transcoder's with its target's beside it, or `data.eval_target_shards_dir`).
  """
  d = config.data
  if d.source == "synthetic":
    held_out = config.copy_and_resolve_references()
    held_out.data.seed = d.seed + 1_000_003  # a stream training never reads
    return make_source(held_out)
  if d.eval_shards_dir:
    return _shards(config, d.eval_shards_dir, d.get("eval_target_shards_dir", ""), prefetch=0)
  return None


__all__ = ["ActivationSource", "make_source", "make_eval_source"]
