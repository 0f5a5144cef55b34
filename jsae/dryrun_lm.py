"""Dry runs of the LM stages: what a harvest or an evaluation costs, before any weight is read.

  jsae harvest --config=configs/gemma2_9b.py:site=resid_post,layer=20 --dry_run
  jsae eval --config=configs/gemma2_9b.py:site=resid_post,layer=20 --dry_run

From the config alone: the LM mesh `config.lm.mesh` resolves to on each named machine
(auto picks the fewest model devices whose weight share fits half a device), the
weights and activations per device on it (whether they fit, and if not the smallest
mesh that does), FLOPs per token, tokens, disk for the harvested activations in
float32 and bfloat16, and wall time at an assumed LM MFU.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from jsae import evals
from jsae.hardware import HARDWARE, LM_MFU, lm_flops_per_token, suffix_flops_per_token
from jsae.lm import gemma, next_token
from jsae.lm import mesh as lm_mesh

STAGES = ("harvest", "eval")


def _sites(config) -> list[str]:
  target = config.sae.get("target_site", "")
  return [config.lm.site] + ([target] if target and target != config.lm.site else [])


def activation_bytes(lm_config: gemma.GemmaConfig, seq_len: int, contexts: int, model: int,
                     kept_width: int) -> int:
  """Bytes one device holds for `contexts` contexts of a forward split `model` ways:
  what it keeps (`kept_width` floats a token: captured sites, hidden states) and one
  block's transients (float32 attention scores of its heads, its d_ff slice, the
  residual stream and the norms' copies)."""
  c = lm_config
  per_context = seq_len * (kept_width + c.n_heads // model * seq_len + 3 * c.d_ff // model
                           + 6 * c.d_model)
  return int(contexts * per_context * 4)


def _stage_figures(config, stage: str, lm_config: gemma.GemmaConfig) -> dict:
  """Tokens, FLOPs per token, batch and per-context kept width of one LM stage."""
  seq, site = config.text.seq_len, config.lm.site
  if stage == "harvest":
    sites = _sites(config)
    deepest = max(sites, key=lambda s: gemma.parse_site(s, lm_config)[1])
    tokens = int(config.text.max_train_tokens or config.train.num_tokens)
    tokens += int(config.text.max_eval_tokens)
    width = sum(evals.site_width(lm_config, s) for s in sites)
    return dict(sites=sites, tokens=tokens, batch=int(config.harvest.batch_size),
                flops_per_token=lm_flops_per_token(lm_config, deepest, seq), kept_width=width,
                logit_bytes=0, sae_bytes=0, disk={dtype: tokens * width * np.dtype(dtype).itemsize
                                     for dtype in ("float32", "bfloat16")})
  _, layer = gemma.parse_site(site, lm_config)
  forwards = 3 + bool(config.eval.saebench)  # clean, zero ablation(s), one spliced SAE
  prefix = (lm_flops_per_token(lm_config, gemma.site_name("resid_post", layer - 1), seq)
            if layer else 0.0)
  budget = config.eval.memory_mb << 20
  batch = int(config.eval.batch_size) or evals.auto_batch_size(lm_config, site, seq, 1,
                                                               budget // 2)
  chunk = next_token.chunk_positions(lm_config.vocab_size, budget // 2)
  d_in, d_sae = evals.site_width(lm_config, site), int(config.sae.d_sae)
  return dict(sae_bytes=(2 * d_in * d_sae + 2 * d_sae + d_in) * 4,  # float32 W_enc, W_dec, ...
              sites=[site], tokens=int(config.eval.lm_contexts) * seq, batch=batch,
              flops_per_token=prefix + forwards * suffix_flops_per_token(lm_config, site, seq),
              kept_width=lm_config.d_model * (forwards + 1) + evals.site_width(lm_config, site),
              logit_chunk=chunk, logit_bytes=next_token._LIVE_TENSORS * 4 * chunk  # pylint: disable=protected-access
              * lm_config.vocab_size, disk={})


def _mesh_row(config, lm_config, figures: dict, name: str, devices: int,
              memory_bytes: int | None, on_cpu: bool, peak_tflops: float | None) -> dict:
  """One machine's row: the resolved mesh and its per-device bytes, or why it is refused."""
  row = dict(hardware=name, devices=devices)
  try:
    data, model = lm_mesh.shape_for(config.lm.mesh, lm_config, n_devices=devices,
                                    memory_bytes=memory_bytes, on_cpu=on_cpu,
                                    dtype=config.lm.dtype)
  except lm_mesh.LMMeshError as e:
    row["refused"] = str(e)
    return row
  batch = -(-figures["batch"] // data) * data
  weights = lm_mesh.per_device_param_bytes(lm_config, model, config.lm.dtype)
  acts = activation_bytes(lm_config, config.text.seq_len, batch // data, model,
                          figures["kept_width"]) + figures["logit_bytes"] // model
  # The evaluated SAE: its latents split over the model axis where they divide it.
  split = model if int(config.sae.d_sae) % model == 0 else 1
  acts += figures["sae_bytes"] // split
  row.update(data=data, model=model, batch=batch, weight_bytes=weights, activation_bytes=acts,
             fits=memory_bytes is None or weights + acts <= memory_bytes)
  if not row["fits"]:
    row["smallest"] = lm_mesh.smallest_fitting_model(lm_config, devices, memory_bytes,
                                                     config.lm.dtype, 1.0)
  if peak_tflops:
    flops = figures["flops_per_token"] * figures["tokens"]
    row["wall_s"] = flops / (data * model * peak_tflops * 1e12 * LM_MFU)
  return row


def estimate(config: ml_collections.ConfigDict, stage: str, hardware=HARDWARE) -> dict:
  """Every figure of one LM stage ('harvest' or 'eval') of `config`, as a dict."""
  if stage not in STAGES:
    raise ValueError(f"stage {stage!r}: use one of {STAGES}.")
  if config.lm.model not in gemma.list_configs():
    raise ValueError(f"config.lm.model: {config.lm.model!r} is not a known architecture;"
                     f" the dry run needs one of {', '.join(gemma.list_configs())}.")
  lm_config = gemma.get_config(config.lm.model)
  figures = _stage_figures(config, stage, lm_config)
  rows = [_mesh_row(config, lm_config, figures, hw.name, hw.devices,
                    int(hw.memory_gib * 2**30), False, hw.peak_tflops) for hw in hardware]
  local = jax.local_devices()
  on_cpu = local[0].platform == "cpu"
  memory = None if on_cpu else (local[0].memory_stats() or {}).get("bytes_limit")
  rows.append(_mesh_row(config, lm_config, figures,
                        f"here ({len(local)} {local[0].platform})", len(local), memory,
                        on_cpu, None))
  return dict(stage=stage, model=config.lm.model, dtype=config.lm.dtype,
              seq_len=config.text.seq_len,
              whole_weight_bytes=lm_mesh.per_device_param_bytes(lm_config, 1, config.lm.dtype),
              mesh=dict(data=int(config.lm.mesh.data), model=int(config.lm.mesh.model)),
              rows=rows, mfu=LM_MFU, **figures)


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB" if x < 2**40 else f"{x / 2**40:.1f} TiB"


def _duration(seconds: float) -> str:
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h" if seconds < 3 * 86400 else f"{seconds / 86400:.1f} days"


def _auto(n: int) -> str:
  return "auto" if n == 0 else "the rest" if n == -1 else str(n)


def format_estimate(e: dict) -> str:
  """The dry run as text: what `jsae harvest/eval --dry_run` prints."""
  what = ("harvest of " + " + ".join(e["sites"]) if e["stage"] == "harvest"
          else f"delta LM loss at {e['sites'][0]}")
  lines = [f"dry run: {e['model']} {what}: {e['tokens']:,} tokens (contexts of"
           f" {e['seq_len']}) x {e['flops_per_token'] / 1e9:.3g} GFLOP/token ="
           f" {e['flops_per_token'] * e['tokens']:.3g} FLOP; {e['dtype']} weights"
           f" {_gib(e['whole_weight_bytes'])} whole"]
  if e["disk"]:
    lines.append("  activations on disk: " + ", ".join(
        f"{_gib(b)} {d}" for d, b in e["disk"].items()) + " (config.harvest.dtype picks)")
  lines.append(f"  LM mesh config.lm.mesh: data={_auto(e['mesh']['data'])},"
               f" model={_auto(e['mesh']['model'])}; {e['batch']} contexts per forward")
  lines.append(f"  {'machine':14s} {'mesh d x m':>10s} {'weights/dev':>11s} {'acts/dev':>9s}"
               f" {'fits':>4s} {'wall time':>10s}")
  for r in e["rows"]:
    if "refused" in r:
      lines.append(f"  {r['hardware']:14s} refused: {r['refused']}")
      continue
    wall = _duration(r["wall_s"]) if "wall_s" in r else "-"
    fits = "yes" if r["fits"] else "NO"
    lines.append(f"  {r['hardware']:14s} {r['data']:>5d} x{r['model']:>2d}"
                 f" {_gib(r['weight_bytes']):>11s} {_gib(r['activation_bytes']):>9s}"
                 f" {fits:>4s} {wall:>10s}"
                 + (f"  (model={r['smallest']} fits the weights)"
                    if not r["fits"] and r.get("smallest") else ""))
  lines.append(f"  (weights: the device's share, matrices in {e['dtype']}, norms float32;"
               " acts: one forward's batch share and one block's transients"
               + (", the logit chunks and one SAE (latents split over model; each SAE"
                  " of a sweep evaluated together adds as much)" if e["stage"] == "eval"
                  else "")
               + f"; wall time = FLOPs / (devices x bf16 peak x an assumed {e['mfu']:.0%}"
               " LM MFU), every device of the machine on the LM)")
  return "\n".join(lines)


__all__ = ["STAGES", "activation_bytes", "estimate", "format_estimate"]
