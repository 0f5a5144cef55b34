"""Dry runs: what a train or sweep config costs, built abstractly (no weights, no data).

  jsae train --config=configs/gemma2_9b.py:site=resid_post,layer=20 --dry_run
  jsae sweep --config=configs/gemma2_9b.py:families=jumprelu+gated+topk --dry_run

Every figure comes from `jax.eval_shape` and the config: parameter and
optimizer bytes (exact; per device from the sharding specs, on each named
hardware's mesh), FLOPs per step (the family's `step_matmuls` x 2 B d_in d_sae
per SAE), tokens and steps, activation storage, the LM FLOPs and disk of the
harvest that feeds the run, and wall time at a model-FLOPs utilisation (MFU)
whose source is printed: measured on one H100 by `bench/sharded_step.py`, and
for TPUs Gemma Scope's reported figure (not measured by this project). Where the
config's mesh fits the local devices, the step is also compiled and XLA's own
FLOP count and memory are shown beside the estimate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import numpy as np

from jsae import config as config_lib
from jsae import optim, saes, sharding, sweep, train
from jsae.hardware import HARDWARE, LM_MFU, lm_flops_per_token
from jsae.lm import gemma

@dataclasses.dataclass(frozen=True)
class GroupCost:
  """One compiled group (a single run is a group of one).

  Attributes:
    name: the group's name ('' for a single run).
    config: its compiled config.
    family: its SAE family.
    members: SAEs trained by the group's step.
    abstract: the group's state as ShapeDtypeStructs.
    specs: PartitionSpecs of `abstract`.
    params: parameters of one SAE.
    param_bytes: bytes of all members' parameters.
    opt_bytes: bytes of all members' optimizer state.
    flops_per_step: model FLOPs of one step of every member.
  """

  name: str
  config: ml_collections.ConfigDict
  family: saes.Family
  members: int
  abstract: object
  specs: object
  params: int
  param_bytes: int
  opt_bytes: int
  flops_per_step: float


def _bytes(tree) -> int:
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def row_width(config) -> int:
  """Floats in one row of the run's data: d_in, or a transcoder's d_in + d_out pair."""
  return config.sae.d_in + (out_width(config) if saes.base.is_transcoder(config) else 0)


def out_width(config) -> int:
  """The decoder's width d_out (d_in for an SAE)."""
  return int(config.sae.get("d_out", 0) or config.sae.d_in)


def step_flops(config, family: saes.Family) -> float:
  """Model FLOPs of one train step of one SAE: step_matmuls x 2 B d_in d_sae.

  Of a family's `step_matmuls`, 2 touch the encoder (forward, weight gradient) and the
  rest the decoder, which a transcoder runs at its own width d_out; its skip adds a
  forward and two gradient matmuls of B d_in d_out.
  """
  b, d_in, d_sae, d_out = (config.data.batch_size, config.sae.d_in, config.sae.d_sae,
                           out_width(config))
  flops = 2 * b * d_sae * (2 * d_in + (family.step_matmuls - 2) * d_out)
  if config.sae.get("skip", False):
    flops += 3 * 2 * b * d_in * d_out
  return float(flops)


def group_costs(config: ml_collections.ConfigDict) -> list[GroupCost]:
  """The config's compiled groups, abstractly: one for a train config, one per sweep group."""
  steps = config_lib.total_steps(config)
  if "sweep" in config:
    out = []
    for g in sweep.plan(config):
      abstract = jax.eval_shape(functools.partial(sweep.init_group, g, total_steps=steps))
      out.append(_cost(g.name, g.config, g.family, len(g.members), abstract,
                       sweep.group_specs(abstract, g.family), abstract.members))
    return out
  config_lib.validate(config)
  family = saes.get(config.sae.family)
  optimizer = optim.make_optimizer(config.optim, total_steps=steps)
  abstract = jax.eval_shape(functools.partial(train.create_state, config=config,
                                              optimizer=optimizer), jax.random.key(config.seed))
  return [_cost("", config, family, 1, abstract, sharding.state_specs(abstract, family),
                abstract)]


def _cost(name, config, family, members, abstract, specs, state) -> GroupCost:
  params = int(sum(x.size for x in jax.tree.leaves(state.params))) // members
  return GroupCost(name=name, config=config, family=family, members=members,
                   abstract=abstract, specs=specs, params=params,
                   param_bytes=_bytes(state.params), opt_bytes=_bytes(state.opt_state),
                   flops_per_step=members * step_flops(config, family))


def mesh_axes(mesh_config, devices: int) -> dict | None:
  """{'sweep', 'data', 'model'} sizes of `mesh_config` on `devices`; None if it does not fit."""
  members = int(mesh_config.get("sweep", 1))
  if members < 1 or devices % members:
    return None
  try:
    data, model = sharding.mesh_shape(mesh_config, devices // members)
  except config_lib.ConfigError:
    return None
  return {"sweep": members, "data": data, "model": model}


def device_bytes(costs: list[GroupCost], axes: dict) -> tuple[int, int]:
  """(every group's state bytes, the largest group's step activation bytes) per device on
  a mesh of `axes`: the groups' steps are separate calls, one group's activations live
  at a time (as `sweep.sweep_bytes` counts for the run itself)."""
  state = sum(sharding.per_device_bytes(c.abstract, c.specs, axes) for c in costs)
  acts = max(sweep.step_working_bytes(c.config, c.members, axes) for c in costs)
  return state, acts


def harvest_cost(config: ml_collections.ConfigDict, d_in: int) -> dict:
  """The LM FLOPs and disk of harvesting the run's activations (train + held-out tokens;
  a transcoder's two sites from one forward: `d_in` is then both widths together)."""
  lm_config = gemma.get_config(config.lm.model)
  train_tokens = int(config.text.max_train_tokens or config.train.num_tokens)
  tokens = train_tokens + int(config.text.max_eval_tokens)
  sites = [config.lm.site] + ([config.sae.target_site] if saes.base.is_transcoder(config)
                              else [])
  deepest = max(sites, key=lambda s: gemma.parse_site(s, lm_config)[1])
  per_token = lm_flops_per_token(lm_config, deepest, config.text.seq_len)
  itemsize = np.dtype(config.harvest.dtype).itemsize
  return dict(model=config.lm.model, site=" + ".join(sites), tokens=tokens,
              flops_per_token=per_token, flops=per_token * tokens,
              disk_bytes=tokens * d_in * itemsize, dtype=config.harvest.dtype)


def estimate(config: ml_collections.ConfigDict, hardware=HARDWARE) -> dict:
  """Every dry-run figure of `config` (train or sweep), as a dict (see `format_estimate`)."""
  costs = group_costs(config)
  base = costs[0].config
  steps = config_lib.total_steps(base)
  flops = sum(c.flops_per_step for c in costs)
  d_in = row_width(base)
  rows = []
  for hw in hardware:
    axes = mesh_axes(config.mesh, hw.devices)
    row = dict(hardware=hw.name, devices=hw.devices, mesh=axes, mfu_source=hw.mfu_source)
    if axes is None:
      rows.append(row)
      continue
    state, acts = device_bytes(costs, axes)
    mfu = hw.mfu[base.sae.compute_dtype]
    step_s = flops / (hw.devices * hw.peak_tflops * 1e12 * mfu)
    row.update(state_bytes=state, activation_bytes=acts,
               fits=state + acts <= hw.memory_gib * 2**30, mfu=mfu, step_s=step_s,
               wall_s=step_s * steps,
               read_bytes_per_s=base.data.batch_size * d_in * 4 / step_s)
    rows.append(row)
  return dict(
      groups=[dict(name=c.name, family=c.family.name, members=c.members, d_in=c.config.sae.d_in,
                   d_sae=c.config.sae.d_sae, params_per_sae=c.params, param_bytes=c.param_bytes,
                   opt_bytes=c.opt_bytes, flops_per_step=c.flops_per_step,
                   step_matmuls=c.family.step_matmuls) for c in costs],
      saes=sum(c.members for c in costs), batch_size=base.data.batch_size,
      tokens=steps * base.data.batch_size, steps=steps, flops_per_step=flops,
      flops=flops * steps, compute_dtype=base.sae.compute_dtype,
      shard_bytes=steps * base.data.batch_size * d_in * 4,
      harvest=harvest_cost(base, d_in), hardware=rows,
      compiled=_compiled_figures(config, costs))


def _compiled_figures(config, costs: list[GroupCost]) -> dict:
  """XLA's FLOPs and memory of the steps compiled for the local devices (or why not)."""
  backend = jax.default_backend()
  axes = mesh_axes(config.mesh, len(jax.devices()))
  if axes is None:
    return dict(backend=backend, skipped=f"config.mesh does not fit the {len(jax.devices())}"
                f" local {backend} device(s)")
  mesh = sharding.make_mesh(config.mesh, sweep=axes["sweep"] if "sweep" in config else None)
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)
  flops = mem = 0.0
  for c in costs:
    state_sharding = sharding.named(mesh, c.specs)
    settings = train.StepSettings.from_config(c.config, 1.0, 1.0)
    steps = config_lib.total_steps(c.config)
    batch = jax.ShapeDtypeStruct((c.config.data.batch_size, row_width(c.config)), np.float32)
    if c.name:
      g = next(g for g in sweep.plan(config) if g.name == c.name)
      hparams = jax.eval_shape(lambda g=g: sweep.group_hyperparams(g))
      # The lean step: what a run of this size runs between its logs (loop.uses_lean_steps).
      fn = functools.partial(sweep.group_step, settings=settings, optim_config=c.config.optim,
                             total_steps=steps, with_metrics=False)
      args = (c.abstract, batch, hparams)
      shardings = (state_sharding, batch_sharding, None)
    else:
      fn = functools.partial(train.train_step, hparams=train.hyperparams(c.config),
                             settings=settings,
                             optimizer=optim.make_optimizer(c.config.optim, total_steps=steps),
                             with_metrics=False)
      args = (c.abstract, batch)
      shardings = (state_sharding, batch_sharding)
    compiled = jax.jit(fn, in_shardings=shardings, out_shardings=(state_sharding, None),
                       donate_argnums=0).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # An SPMD-partitioned program's cost analysis counts one device's share.
    flops += float((cost or {}).get("flops", float("nan"))) * mesh.size
    m = compiled.memory_analysis()
    if m is not None:
      mem += (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
              + m.temp_size_in_bytes)
  return dict(backend=backend, mesh=axes, flops_per_step=flops, bytes_per_device=mem)


def _si(x: float, unit: str = "") -> str:
  for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"),
                        (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def _gib(x: float) -> str:
  return f"{x / 2**30:.2f} GiB" if x < 2**40 else f"{x / 2**40:.1f} TiB"


def _duration(seconds: float) -> str:
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  if seconds < 3 * 86400:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} days"


def format_estimate(e: dict) -> str:
  """The dry run as text: what `jsae train/sweep --dry_run` prints."""
  lines = [f"dry run: {e['saes']} SAE(s), {e['tokens']:,} tokens = {e['steps']:,} steps of"
           f" {e['batch_size']}, {e['compute_dtype']} matmuls"]
  for g in e["groups"]:
    label = f"group {g['name']}: " if g["name"] else ""
    lines.append(
        f"  {label}{g['members']} x {g['family']} {g['d_in']} x {g['d_sae']}:"
        f" {g['params_per_sae']:,} params per SAE; parameters {_gib(g['param_bytes'])},"
        f" optimizer state {_gib(g['opt_bytes'])}; {g['step_matmuls']} matmuls x 2 B d_in"
        f" d_sae = {_si(g['flops_per_step'], 'FLOP')} per step")
  lines.append(f"  total {_si(e['flops_per_step'], 'FLOP')} per step,"
               f" {_si(e['flops'], 'FLOP')} for the run")
  h = e["harvest"]
  lines.append(f"  activations: {_gib(e['shard_bytes'])} of float32 shards read;"
               f" harvest {h['model']} {h['site']}: {h['tokens']:,} tokens (train + held-out)"
               f" x {_si(h['flops_per_token'], 'FLOP')}/token = {_si(h['flops'], 'FLOP')},"
               f" {_gib(h['disk_bytes'])} on disk ({h['dtype']})")
  lines.append(f"  {'hardware':10s} {'mesh s x d x m':>14s} {'state/dev':>10s}"
               f" {'acts/dev':>9s} {'fits':>4s} {'step':>9s} {'wall time':>10s}"
               f" {'read':>10s} {'harvest':>9s}  MFU")
  for r in e["hardware"]:
    if r["mesh"] is None:
      lines.append(f"  {r['hardware']:10s} config.mesh does not fit its {r['devices']} devices")
      continue
    m = r["mesh"]
    hw = next(x for x in HARDWARE if x.name == r["hardware"])
    harvest_s = h["flops"] / (hw.devices * hw.peak_tflops * 1e12 * LM_MFU)
    lines.append(
        f"  {r['hardware']:10s} {m['sweep']:>6d} x{m['data']:>2d} x{m['model']:>2d}"
        f" {_gib(r['state_bytes']):>10s} {_gib(r['activation_bytes']):>9s}"
        f" {'yes' if r['fits'] else 'NO':>4s} {r['step_s'] * 1e3:>6.1f} ms"
        f" {_duration(r['wall_s']):>10s} {r['read_bytes_per_s'] / 2**30:>5.2f} GiB/s"
        f" {_duration(harvest_s):>9s}  {r['mfu']:.1%}: {r['mfu_source']}")
  lines.append(f"  (state/dev: every group's parameters and optimizer state; acts/dev: the"
               " largest group's step, as groups run one after another; harvest time at an"
               f" assumed {LM_MFU:.0%} LM MFU; wall time = FLOPs / (devices x bf16 peak x"
               " MFU); 'NO': shard over more devices, config.mesh)")
  c = e["compiled"]
  if "skipped" in c:
    lines.append(f"  compiled: skipped ({c['skipped']})")
  else:
    lines.append(f"  compiled for the local {c['backend']} mesh {c['mesh']}: XLA counts"
                 f" {_si(c['flops_per_step'], 'FLOP')} per step"
                 f" ({c['flops_per_step'] / e['flops_per_step']:.3f} x the estimate),"
                 f" {_gib(c['bytes_per_device'])} per device")
  return "\n".join(lines)
