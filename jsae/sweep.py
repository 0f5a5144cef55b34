"""Sweeps: many SAEs trained in one compiled step, each batch read once.

  jsae sweep --config=configs/sweep_tiny.py --workdir=runs/sweep

A sweep config is a single-run config holding the fields every member shares
(data, optim, train, ckpt, mesh, lm, text, eval, sae.d_in, sae.d_sae, ...) and
`config.sweep.groups`: named groups, each of one family with that family's
own fields and the values its members take (`swept`). Members of a group differ only
in traced values (the family's sparsity knob, k, target L0, bandwidth, ...,
plus `seed` and `lr`), so a group is one `vmap`ped, jitted step over a leading
member axis; groups of other families or shapes are further compiled steps on
the same batch. k is shape-affecting: a group's TopK selection runs at the
group's largest k and keeps each member's first k (the selection is sorted),
which equals `top_k(pre, k)` exactly.

Layout of the sweep's workdir:

  sweep.json            the plan: groups, members and their values (resume check)
  checkpoints/          the whole sweep's state (every group stacked, frozen flags)
  members/NAME/         each member as a single run (config.json, metrics.jsonl,
                        checkpoints/ written at the end or on preemption), so
                        `jsae report`, `export` and `eval` take a member directory
  summary.json          per member: values, status, last metrics
  report/index.html     the report over all members (Pareto plots across families)

Resuming restores the sweep checkpoint: batches are a function of (seed, step),
so a killed and rerun sweep equals an uninterrupted one bit for bit. A member
whose loss or parameters become NaN/Inf is frozen at its last good state
(and reported) while the others go on.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from jsae import checkpoint, jsonio, loop, optim, recipe, resume, saes, sharding, train
from jsae import config as config_lib

P = jax.sharding.PartitionSpec

# Swept values that are not family fields: the init seed and the learning rate.
COMMON_SWEPT = ("seed", "lr")


# ----------------------------------------------------------------------------- config


def group(family_config: ml_collections.ConfigDict, values: dict, *, mode: str = "grid"
          ) -> ml_collections.ConfigDict:
  """A sweep group: the family fields of `family_config` and the members' `values`.

  Args:
    family_config: a full config of the group's family (e.g.
      `tiny.get_config('family=topk')`); its own sae./loss. fields, its family's
      optim defaults and its recipe are kept, the shared fields come from the sweep.
    values: {field: sequence} of swept values: the family's traced fields (bare
      names: 'sparsity_coeff', 'k', ...), 'seed' and 'lr'. Every sweepable field
      is in the group's `swept`, an empty tuple for those not swept (the group's
      or the sweep's shared value), so the command line can sweep any of them:
      --config.sweep.groups.NAME.swept.lr='(1e-3, 3e-4)'.
    mode: 'grid' (every combination) or 'zip' (the i-th of every sequence;
      sequences of length 1 are repeated).
  """
  family = saes.get(family_config.sae.family)
  g = ml_collections.ConfigDict()
  g.family = family.name  # the group's SAE family
  g.recipe = family_config.get("recipe", "gemma_scope")  # its config's recipe (jsae.recipe)
  g.mode = mode  # 'grid' (cartesian product of values) or 'zip' (i-th of each)
  for name in ("sae", "loss"):
    g[name] = ml_collections.ConfigDict(
        {k: family_config[name][k] for k in family.fields.get(name, {})})
  g.optim = ml_collections.ConfigDict(
      {d.split(".")[1]: family_config.optim[d.split(".")[1]]
       for d in family.config_defaults if d.startswith("optim.")})
  # Unknown or static fields in `values` are refused by `plan`, with the fix.
  g.swept = ml_collections.ConfigDict({k: () for k in sweepable(family)})
  for k, v in values.items():
    g.swept[k] = tuple(v)
  return g


def sweepable(family: saes.Family) -> tuple[str, ...]:
  """The fields a group of `family` can sweep: its traced fields, 'seed' and 'lr'."""
  return tuple(n.split(".")[1] for n in family.traced_names()) + COMMON_SWEPT


def sweep_config(base: ml_collections.ConfigDict, groups: dict[str, ml_collections.ConfigDict],
                 ) -> ml_collections.ConfigDict:
  """`base` (the shared fields) with its family fields removed and `sweep.groups` added."""
  c = ml_collections.ConfigDict(base.to_dict())
  for name in ("sae", "loss"):
    common = set(saes.base.COMMON_FIELDS[name]) - {"family"}
    for key in [k for k in c[name].keys() if k not in common]:
      del c[name][key]
  c.sweep = ml_collections.ConfigDict()
  c.sweep.groups = ml_collections.ConfigDict(groups)  # name -> `group(...)`
  c.sweep.memory_limit_gb = 0.0  # device memory a group may use (0: the device's own)
  c.sweep.report = True  # write report/ over all members at the end
  # How one compiled step runs the members: 'vmap' (batched matmuls: fills an
  # accelerator), 'map' (one member after another in the same step: XLA:CPU's batched
  # matmuls run at ~0.8 of separate ones), 'auto' (map on CPU without a sweep mesh axis).
  c.sweep.member_loop = "auto"
  return c


@dataclasses.dataclass(frozen=True)
class Member:
  """One SAE of a sweep.

  Attributes:
    name: unique directory name (group and swept values).
    group: its group's name.
    index: its position on the group's member axis.
    values: {field: value} it was given.
    config: the member as a single-run config (what `jsae train` would take).
  """

  name: str
  group: str
  index: int
  values: dict
  config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Group:
  """Members of one family and shape, trained by one compiled step.

  Attributes:
    name: the group's name in `config.sweep.groups`.
    family: its SAE family.
    members: the members, in member-axis order.
    config: the group's compiled config: the first member's, at the largest k.
  """

  name: str
  family: saes.Family
  members: tuple[Member, ...]
  config: ml_collections.ConfigDict


def _field_error(group_name: str, field: str, message: str) -> config_lib.ConfigError:
  return config_lib.ConfigError(f"config.sweep.groups.{group_name}.{field}: {message}")


def _combinations(group_name: str, g) -> list[dict]:
  """The members' {field: value} dicts of a group, by its mode (an empty sequence: the
  field is not swept)."""
  values = {k: list(v) if isinstance(v, (tuple, list)) else [v] for k, v in g.swept.items()}
  values = {k: v for k, v in values.items() if v}
  if not values:
    return [{}]
  keys = sorted(values)
  if g.mode == "grid":
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values[k] for k in keys))]
  if g.mode == "zip":
    n = max(len(v) for v in values.values())
    bad = [k for k, v in values.items() if len(v) not in (1, n)]
    if bad:
      raise _field_error(group_name, f"swept.{bad[0]}",
                         f"has {len(values[bad[0]])} values but mode='zip' pairs {n}; give"
                         " every field the same number of values (or one), or use"
                         " mode='grid'.")
    return [{k: v[i if len(v) > 1 else 0] for k, v in values.items()} for i in range(n)]
  raise _field_error(group_name, "mode", f"{g.mode!r} is not 'grid' or 'zip'.")


def _format_value(v) -> str:
  return format(v, "g") if isinstance(v, float) else str(v)


def _member_name(group_name: str, values: dict, varying: list[str]) -> str:
  parts = [f"{k}={_format_value(values[k])}" for k in varying]
  return "-".join([group_name] + parts)


def _swept_group(family: saes.Family, field: str) -> str | None:
  """The config group ('sae', 'loss', ...) a swept field is set in, or None if not sweepable."""
  if field == "seed":
    return ""
  if field == "lr":
    return "optim"
  for dotted in family.traced_names():
    group_name, name = dotted.split(".")
    if name == field:
      return group_name
  return None


def member_config(config: ml_collections.ConfigDict, group_name: str, values: dict
                  ) -> ml_collections.ConfigDict:
  """The single-run config of the member of group `group_name` with `values`."""
  g = config.sweep.groups[group_name]
  c = config.to_dict()
  del c["sweep"]
  c = ml_collections.ConfigDict(c)
  c.sae.family = g.family
  c.recipe = g.get("recipe", c.get("recipe", "gemma_scope"))
  saes.base.configure(c, g.family)
  for name in ("sae", "loss", "optim"):
    for k, v in g[name].items():
      c[name][k] = v
  family = saes.get(g.family)
  for field, value in values.items():
    where = _swept_group(family, field)
    if where == "":
      c[field] = value
    elif where == "optim":
      c.optim.lr = value
    else:
      c[where][field] = value
  return c


def plan(config: ml_collections.ConfigDict) -> tuple[Group, ...]:
  """The sweep's groups and members from `config.sweep`; ConfigError on bad input.

  Checks: every swept field is traced (a shape or static setting needs its own
  group), member names are unique, and every member is a valid single-run config.
  """
  if "sweep" not in config or not config.sweep.groups:
    raise config_lib.ConfigError(
        "config.sweep.groups: a sweep config needs at least one group; build it with"
        " jsae.sweep.sweep_config(base, {name: jsae.sweep.group(family_config, values)})"
        " (see configs/sweep_tiny.py).")
  groups, names = [], {}
  for group_name in sorted(config.sweep.groups):
    g = config.sweep.groups[group_name]
    if g.family not in saes.names():
      raise _field_error(group_name, "family", f"unknown family {g.family!r}; known:"
                         f" {saes.names()}.")
    family = saes.get(g.family)
    for field in g.swept:
      if _swept_group(family, field) is None:
        static = [f"{grp}.{field}" for grp in ("sae", "loss", "optim", "data", "train")
                  if field in family.fields.get(grp, {}) or field in config.get(grp, {})]
        what = (f"{static[0]} is a static (shape or compiled) setting, so members that"
                " differ in it cannot share one compiled step; give each value a group of"
                " its own" if static else f"{field!r} is not a field of family {family.name!r}")
        raise _field_error(group_name, f"swept.{field}",
                           f"{what}. Sweepable here: {', '.join(sweepable(family))}.")
    combos = _combinations(group_name, g)
    varying = [k for k in sorted(combos[0]) if len({repr(c[k]) for c in combos}) > 1]
    members = []
    for i, values in enumerate(combos):
      name = _member_name(group_name, values, varying)
      if name in names:
        raise _field_error(group_name, "swept",
                           f"members {names[name]} and {group_name}[{i}] are both named"
                           f" {name!r} (the same values twice, or the same group name and"
                           " values in two groups); remove the duplicate value.")
      names[name] = f"{group_name}[{i}]"
      mc = member_config(config, group_name, values)
      try:
        config_lib.validate(mc)
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"sweep member {name} (group {group_name}): {e}") from None
      members.append(Member(name=name, group=group_name, index=i, values=values, config=mc))
    compiled = family.group_config([m.config for m in members])
    groups.append(Group(name=group_name, family=family, members=tuple(members),
                        config=compiled))
  return tuple(groups)


def latent_cells(groups: tuple[Group, ...]) -> int:
  """The `[batch, d_sae]` latent cells of one sweep step: every member of every group."""
  return sum(len(g.members) * g.config.data.batch_size * g.config.sae.d_sae for g in groups)


def plan_json(groups: tuple[Group, ...]) -> dict:
  """The plan as JSON: what defines the sweep (checked on resume)."""
  return {"groups": [
      {"name": g.name, "family": g.family.name,
       "members": [{"name": m.name, "values": m.values, "config": m.config.to_dict()}
                   for m in g.members]}
      for g in groups]}


def check_resume_plan(saved: dict, groups: tuple[Group, ...], ckpt_dir) -> None:
  """Raises ConfigError when the sweep in `ckpt_dir` had other groups, members or fields."""
  now = json.loads(json.dumps(plan_json(groups)))  # tuples as lists, as saved
  before = {g["name"]: g for g in saved["groups"]}
  after = {g["name"]: g for g in now["groups"]}
  fix = (" Resume with the grid the sweep started with, or use a new --workdir"
         " (a changed grid would silently continue other runs).")
  if sorted(before) != sorted(after):
    raise config_lib.ConfigError(
        f"config.sweep.groups: the checkpoint in {ckpt_dir} has groups {sorted(before)},"
        f" the config {sorted(after)}.{fix}")
  for name, g in after.items():
    b = before[name]
    if b["family"] != g["family"] or [m["name"] for m in b["members"]] != [
        m["name"] for m in g["members"]]:
      raise config_lib.ConfigError(
          f"config.sweep.groups.{name}.swept: the checkpoint's members are"
          f" {[m['name'] for m in b['members']]}, the config's"
          f" {[m['name'] for m in g['members']]}.{fix}")
    for saved_member, member in zip(b["members"], next(gr for gr in groups
                                                     if gr.name == name).members):
      meta = dict(resume.shape_meta(ml_collections.ConfigDict(saved_member["config"])),
                  config=saved_member["config"])
      try:
        resume.check_compatible(meta, member.config, ckpt_dir)
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"sweep member {member.name}: {e}") from None


# ----------------------------------------------------------------------------- the step


@struct.dataclass
class GroupState:
  """A group's members stacked on a leading axis.

  Attributes:
    members: a `train.TrainState` whose every leaf has a leading `[n]` axis.
    frozen: `[n]` bool, members stopped after a non-finite loss or parameter.
    frozen_step: `[n]` int32, the step whose update was rejected (-1: running).
  """

  members: train.TrainState
  frozen: jax.Array
  frozen_step: jax.Array


def group_hyperparams(group: Group) -> dict:
  """{name: [n]} the members' traced values: the family's knobs and 'lr'."""
  per_member = [dict(group.family.hyperparams(m.config),
                     lr=jnp.asarray(m.config.optim.lr, jnp.float32)) for m in group.members]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *per_member)


def init_group(group: Group, *, total_steps: int, b_dec=None) -> GroupState:
  """The group's state at step 0: member i initialised from `jax.random.key(seed_i)`."""
  optimizer = optim.make_optimizer(group.config.optim, total_steps=total_steps)
  keys = jnp.stack([jax.random.key(int(m.config.seed)) for m in group.members])
  members = jax.vmap(lambda key: train.create_state(key, group.config, optimizer, b_dec=b_dec)
                     )(keys)
  n = len(group.members)
  return GroupState(members=members, frozen=jnp.zeros([n], bool),
                    frozen_step=jnp.full([n], -1, jnp.int32))


def _member_step(state, batch, hparams, *, settings, optim_config, total_steps, with_metrics):
  """`train.train_step` for one member, its optimizer built at its own (traced) lr."""
  hparams = dict(hparams)
  optimizer = optim.make_optimizer(optim_config, total_steps=total_steps, lr=hparams.pop("lr"))
  return train.train_step(state, batch, hparams, settings=settings, optimizer=optimizer,
                          with_metrics=with_metrics)


def _finite_per_member(tree) -> jax.Array:
  """`[n]` bool: every float leaf of member i is finite."""
  leaves = [jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1)
            for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves), axis=0)


MEMBER_LOOPS = ("auto", "vmap", "map")


def member_loop(config, sweep_axis: int = 1) -> str:
  """'vmap' or 'map': `config.sweep.member_loop`, with 'auto' resolved for this backend
  (map on CPU, where batched matmuls are slower than separate ones, unless members are
  sharded over a 'sweep' mesh axis); ConfigError on an unknown value."""
  loop = config.sweep.get("member_loop", "auto")  # sweeps saved before the field: auto
  if loop not in MEMBER_LOOPS:
    raise config_lib.ConfigError(f"config.sweep.member_loop: {loop!r} is not one of"
                                 f" {MEMBER_LOOPS}.")
  if loop == "auto":
    return "map" if jax.default_backend() == "cpu" and sweep_axis == 1 else "vmap"
  return loop


# An update this many times larger than the parameters it changes (global norms) is a
# blow-up, not learning: Adam moves each entry by about lr, so a sane run's ratio is
# about lr * sqrt(d_in) / (decoder row norm), far below 1.
MAX_UPDATE_RATIO = 100.0


def update_ratio(new, old) -> jax.Array:
  """`[]` ||new - old|| / ||old|| over every float leaf (global norms)."""
  delta = jax.tree.map(lambda a, b: a - b, new, old)
  return optax.global_norm(delta) / jnp.maximum(optax.global_norm(old), 1e-30)


def group_step(state: GroupState, batch: jax.Array, hparams: dict, *, settings: train.StepSettings,
               optim_config, total_steps: int, with_metrics: bool = True,
               loop: str = "vmap") -> tuple[GroupState, dict]:
  """One update of every member on the shared `batch: [batch, d_in]`; metrics are `[n]`.

  `loop`: 'vmap' (one batched step) or 'map' (`lax.map`: the members one after
  another inside the same compiled step, the batch read once either way).
  A member whose update is unhealthy (a non-finite loss or parameter, or
  parameters that change by more than `MAX_UPDATE_RATIO` times their norm) keeps
  its previous state and is frozen from then on, so its frozen state is its last
  healthy one; the others are unaffected (members are independent under either
  loop).
  """
  step = functools.partial(_member_step, settings=settings, optim_config=optim_config,
                           total_steps=total_steps, with_metrics=with_metrics)
  if loop == "map":
    new, metrics = jax.lax.map(lambda a: step(a[0], batch, a[1]), (state.members, hparams))
  else:
    new, metrics = jax.vmap(step, in_axes=(0, None, 0))(state.members, batch, hparams)
  ratio = jax.vmap(update_ratio)(new.params, state.members.params)
  ok = (jnp.isfinite(metrics["loss"]) & _finite_per_member(new.params)
        & (ratio <= MAX_UPDATE_RATIO) & ~state.frozen)

  def keep(n, o):
    return jnp.where(ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

  members = jax.tree.map(keep, new, state.members)
  newly = ~ok & ~state.frozen
  frozen_step = jnp.where(newly, state.members.step, state.frozen_step)
  return GroupState(members=members, frozen=state.frozen | newly,
                    frozen_step=frozen_step), metrics


def group_specs(abstract: GroupState, family: saes.Family) -> GroupState:
  """PartitionSpecs of a GroupState: the member axis on 'sweep', the rest as a single run."""
  member = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract.members)
  specs = sharding.state_specs(member, family)
  stacked = jax.tree.map(lambda s: P("sweep", *s), specs, is_leaf=lambda s: isinstance(s, P))
  return GroupState(members=stacked, frozen=P("sweep"), frozen_step=P("sweep"))


def member_state(state: GroupState, member: Member, family: saes.Family) -> train.TrainState:
  """Member `member.index`'s TrainState, with its own static settings (`member_params`)."""
  one = jax.tree.map(lambda x: x[member.index], state.members)
  return one.replace(params=family.member_params(one.params, member.config))


# ----------------------------------------------------------------------------- memory


def state_bytes(abstract_group: GroupState, family: saes.Family, axis_sizes) -> int:
  """Bytes of a group's state on one device of a mesh of `axis_sizes` (members over
  'sweep', latents over 'model'; exact, from the specs)."""
  return sharding.per_device_bytes(abstract_group, group_specs(abstract_group, family),
                                   dict(axis_sizes))


def step_working_bytes(config, members: int, axis_sizes) -> int:
  """Bytes of one step's activations per device: ~6 float32 `[batch, d_sae]` per member
  (pre-activations, codes, their gradients and the masks), split over the mesh."""
  axis_sizes = dict(axis_sizes)
  rows = -(-config.data.batch_size // axis_sizes.get("data", 1))
  latents = -(-config.sae.d_sae // axis_sizes.get("model", 1))
  return int(6 * 4 * rows * latents * -(-members // axis_sizes.get("sweep", 1)))


def device_memory_bytes(config) -> tuple[int | None, str]:
  """(bytes one device offers, where that figure comes from); None when unknown.

  config.sweep.memory_limit_gb when set, else the accelerator's limit, else
  (CPU) the machine's memory.
  """
  if config.sweep.memory_limit_gb > 0:
    return int(config.sweep.memory_limit_gb * 2**30), "config.sweep.memory_limit_gb"
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind}'s memory"
  try:  # CPU: the machine's memory
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "host memory"
  except (ValueError, OSError, AttributeError):
    return None, "unknown"


def sweep_bytes(groups: tuple[Group, ...], abstracts: dict, axis_sizes) -> tuple[int, int]:
  """(every group's state, the largest group's step activations) in bytes per device.

  The groups' steps are separate compiled calls that run one after another, so
  only one group's activations are live at a time, beside every group's state.
  """
  states = sum(state_bytes(abstracts[g.name], g.family, axis_sizes) for g in groups)
  steps = max(step_working_bytes(g.config, len(g.members), axis_sizes) for g in groups)
  return states, steps


def check_fits(groups: tuple[Group, ...], abstracts: dict, mesh, limit: int | None,
               limit_source: str = "device memory") -> None:
  """Raises ConfigError (before compiling) when the sweep's states and its largest
  group's step (`sweep_bytes`) exceed `limit`."""
  if limit is None:
    return
  states, steps = sweep_bytes(groups, abstracts, mesh.shape)
  total = states + steps
  if total <= limit:
    return
  own = {g.name: state_bytes(abstracts[g.name], g.family, mesh.shape)
         + step_working_bytes(g.config, len(g.members), mesh.shape) for g in groups}
  worst = max(groups, key=lambda g: own[g.name])
  per_member = own[worst.name] / len(worst.members)
  others = states - state_bytes(abstracts[worst.name], worst.family, mesh.shape)
  fits = max(int((limit - others) // per_member), 0)
  raise config_lib.ConfigError(
      f"config.sweep.groups.{worst.name}: the sweep needs about {total / 2**30:.3g} GiB per"
      f" device (every group's state and the largest group's step activations) but a"
      f" device has {limit / 2**30:.3g} GiB ({limit_source}); group {worst.name!r} has"
      f" {len(worst.members)} members and about {fits} fit. Split the group into several"
      " sweeps, shard the members with config.mesh.sweep, the latents with"
      " config.mesh.model, or lower config.data.batch_size.")


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class SweepResult:
  """What `sweep` returns.

  Attributes:
    states: {group name: GroupState} after the last step.
    groups: the plan.
    metrics: {member name: last logged metrics}.
    steps: the step reached.
    workdir: the sweep directory.
    preempted: True when SIGTERM or Ctrl-C stopped the sweep (after a checkpoint).
    frozen: {member name: status} of the members frozen by an unhealthy update.
    unhealthy: {member name: health warning} of members failing without NaN.
  """

  states: dict
  groups: tuple
  metrics: dict
  steps: int
  workdir: Path
  preempted: bool = False
  frozen: dict = dataclasses.field(default_factory=dict)
  unhealthy: dict = dataclasses.field(default_factory=dict)


def _restore(workdir, target: dict, step: int | None = None) -> dict:
  """Sweep checkpoint `step`'s (default: the latest) {group: GroupState} in `target`'s
  shardings (CheckpointDamagedError when its files cannot be read).

  A manager of its own: Orbax fixes an item's handler at first use, and the
  sweep's manager saves.
  """
  manager = checkpoint.make_manager(workdir, async_save=False)
  try:
    state, _ = checkpoint.restore(manager, target, step)
  finally:
    manager.close()
  return dict(state)


def member_dir(workdir, member: Member):
  """The member's own run directory, `WORKDIR/members/NAME`."""
  return workdir / "members" / member.name


def _write_members(workdir, groups, states, meta_of) -> None:
  """Each member's checkpoint in its own directory, as a single run writes it."""
  for g in groups:
    for m in g.members:
      state = member_state(states[g.name], m, g.family)
      manager = checkpoint.make_manager(member_dir(workdir, m), max_to_keep=1,
                                        async_save=False)
      try:
        step = int(state.step)
        if manager.latest_step() != step:
          checkpoint.save(manager, step, state, meta_of(m))
        manager.wait_until_finished()
      finally:
        manager.close()


class _Groups(loop.Trainee):
  """A sweep's groups for `loop.run_steps`: every group's compiled step on each batch,
  each member's log line, held-out metrics and health, the frozen members.

  A member whose update is rejected (`group_step`) is frozen by the step itself
  and reported once; a member failing without NaN (`loop.health_warning`) is
  warned about once and marked in its status, as a single run is.
  """

  def __init__(self, groups, states: dict, step_fns: dict, hparams: dict, *, workdir,
               start: int, num_steps: int, held_out: list, norm_scale: float, meta: dict):
    self.groups, self.states = groups, states
    self._step_fns, self._hparams, self._meta = step_fns, hparams, meta
    self._num_steps, self.held_out, self._norm_scale = num_steps, held_out, norm_scale
    self.logs = ({m.name: loop.MetricsLog(member_dir(workdir, m), start)
                  for g in groups for m in g.members} if jax.process_index() == 0 else {})
    self.metrics: dict = {}  # member name -> its last record
    self.reported_frozen: set = set()
    self.warnings: dict = {}  # member name -> its health warning
    self._device_metrics: dict = {}

  def latent_cells(self) -> int:
    return latent_cells(self.groups)

  def step(self, batch, *, with_metrics: bool) -> None:
    for g in self.groups:
      self.states[g.name], self._device_metrics[g.name] = self._step_fns[g.name][with_metrics](
          self.states[g.name], batch, self._hparams[g.name])

  def observe(self, done: int, *, evaluate: bool, clock: loop.Clock) -> None:
    for g in self.groups:
      host = {k: np.asarray(v) for k, v in jax.device_get(self._device_metrics[g.name]).items()}
      frozen = np.asarray(self.states[g.name].frozen)
      frozen_step = np.asarray(self.states[g.name].frozen_step)
      for m in g.members:
        if frozen[m.index]:
          self._report_frozen(m, int(frozen_step[m.index]))
          continue
        metrics = {k: float(v[m.index]) for k, v in host.items()}
        if evaluate:
          one = member_state(self.states[g.name], m, g.family)
          metrics.update(loop.held_out_metrics(one.params, one.family_state, self.held_out,
                                               self._norm_scale))
        record = loop.step_record(metrics, done=done, batch_size=m.config.data.batch_size,
                                  lr=train.optim_lr(m.config, self._num_steps, done - 1),
                                  clock=clock)
        self.metrics[m.name] = record
        if m.name in self.logs:
          self.logs[m.name].write(record)
        warning = loop.health_warning(record, done, m.config)
        if warning and m.name not in self.warnings:
          loop.say(f"warning: sweep member {m.name}: {warning}")
        if warning:
          self.warnings[m.name] = warning

  def _report_frozen(self, member: Member, step: int) -> None:
    if member.name not in self.reported_frozen:
      self.reported_frozen.add(member.name)
      loop.say(f"sweep member {member.name}: its update at step {step} was not finite, or"
               f" over {MAX_UPDATE_RATIO:g} times its parameters; frozen at its last good"
               f" state (step {step}), the other members go on. Lower its lr or enable"
               " config.optim.clip_grad_norm.")

  def save(self, manager, done: int) -> None:
    checkpoint.save(manager, done, self.states, self._meta)

  def postfix(self) -> dict:
    running = [v for v in self.metrics.values() if v.get("fvu") is not None]
    if not running:
      return {}
    return dict(FVU=f"{np.median([v['fvu'] for v in running]):.3f}",
                L0=f"{np.median([v['l0'] for v in running]):.1f}",
                frozen=len(self.reported_frozen))


STATUS_NAME = "status.json"  # in each member's directory: member_status


def member_status(frozen_step: int | None, warning: str | None) -> dict:
  """A member's status record: 'frozen' (with the step), 'unhealthy' (with the health
  warning) or 'ok'; reports leave the first two out of their Pareto fronts."""
  if frozen_step is not None:
    return dict(status="frozen", step=frozen_step,
                detail=f"frozen at step {frozen_step} (a non-finite or exploding update)")
  if warning:
    return dict(status="unhealthy", detail=warning)
  return dict(status="ok")


def member_statuses(sweep_dir) -> dict[str, dict]:
  """{member name: its status record} of the members the sweep in `sweep_dir` planned
  (its sweep.json; other folders under members/ are not its own), in name order
  ({'status': 'ok'} for a member without one, as sweeps before statuses wrote)."""
  plan_file = Path(sweep_dir) / "sweep.json"
  names = sorted(m["name"] for g in json.loads(plan_file.read_text())["groups"]
                 for m in g["members"])
  out = {}
  for name in names:
    try:
      out[name] = json.loads((Path(sweep_dir) / "members" / name / STATUS_NAME).read_text())
    except (OSError, ValueError):
      out[name] = {"status": "ok"}
  return out


def _statuses(groups, states, warnings: dict) -> dict[str, dict]:
  """{member name: `member_status`} from the groups' frozen flags and the health warnings."""
  out = {}
  for g in groups:
    frozen = np.asarray(states[g.name].frozen)
    frozen_step = np.asarray(states[g.name].frozen_step)
    for m in g.members:
      out[m.name] = member_status(int(frozen_step[m.index]) if frozen[m.index] else None,
                                  warnings.get(m.name))
  return out


def _summary(groups, statuses: dict, last_metrics, steps) -> dict:
  members = [dict(name=m.name, group=g.name, family=g.family.name, values=m.values,
                  status=statuses[m.name].get("detail", statuses[m.name]["status"]),
                  metrics=last_metrics.get(m.name, {}), dir=f"members/{m.name}")
             for g in groups for m in g.members]
  return dict(steps=steps, members=members)


def sweep(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          progress: bool = True, source=None) -> SweepResult:
  """Trains every member of `config.sweep` in `workdir`; resumes from its checkpoint.

  Args:
    config: a sweep config (`sweep_config`).
    workdir: the sweep directory (layout in the module docstring).
    progress: show a progress bar.
    source: an `ActivationSource` to use instead of the one the config names.
  """
  # -- Plan and validate, before any compilation.
  groups = plan(config)
  base = groups[0].members[0].config  # the shared fields
  num_steps = config_lib.total_steps(base)
  with loop.Session(base, workdir, source=source) as session:
    workdir, manager = session.workdir, session.manager
    # -- Data, read once per step for every group; recipe 'auto' derived from it.
    source = session.source
    groups = _resolve_recipes(groups, source, num_steps)
    _, meta = checkpoint.newest_intact(
        manager, functools.partial(checkpoint.read_meta, manager), say=loop.say)
    if meta is not None:
      check_resume_plan(meta["plan"], groups, manager.directory)
    for g in groups:
      resume.check_source(g.config, source, meta, manager.directory)

    # -- Mesh and states, restored or initialised, already sharded.
    mesh = sharding.make_mesh(base.mesh, sweep=base.mesh.sweep)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.BATCH_SPEC)
    abstracts, shardings = _abstract_groups(groups, mesh, base, num_steps)
    check_fits(groups, abstracts, mesh, *device_memory_bytes(config))
    if meta is not None:
      target = {name: jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstracts[name],
          shardings[name]) for name in abstracts}
      start, states = checkpoint.resume_newest_intact(
          workdir, manager, functools.partial(_restore, workdir, target), say=loop.say)
      loop.say(f"resuming the sweep from step {start} of {num_steps} in {workdir}")
    else:
      start, states = 0, _init_groups(groups, shardings, source, num_steps)

    # -- Compile: per group, a step with metrics and one without for the steps between
    # logs (jitted, so compiled on first use: only where loop.uses_lean_steps).
    hparams, step_fns = _compile(config, groups, mesh, shardings, batch_sharding, source,
                                 num_steps)
    sweep_meta = dict(plan=plan_json(groups), norm_scale=source.norm_scale,
                      target_norm_scale=getattr(source, "target_norm_scale", None),
                      data_fingerprint=getattr(source, "fingerprint", None),
                      config=config.to_dict())
    if jax.process_index() == 0:
      jsonio.write_json(workdir / "sweep.json", sweep_meta["plan"])
      for g in groups:
        for m in g.members:
          jsonio.write_json(loop.prepare_workdir(member_dir(workdir, m)) / "config.json",
                            m.config.to_dict())

    # -- The loop, with the held-out set (fixed batches) if configured.
    trainee = _Groups(groups, states, step_fns, hparams, workdir=workdir, start=start,
                      num_steps=num_steps, held_out=loop.held_out_batches(base, batch_sharding),
                      norm_scale=loop.norm_scales(source), meta=sweep_meta)
    n_members = sum(len(g.members) for g in groups)
    end = loop.run_steps(trainee, session, base, start=start, num_steps=num_steps,
                         batch_sharding=batch_sharding, evaluating=bool(trainee.held_out),
                         progress=progress, desc=f"sweep ({n_members} SAEs)")

    # -- Members as single runs (with their status), the summary and the report.
    _write_members(workdir, groups, states, lambda m: resume.checkpoint_meta(m.config, source))
  last_lines = {name: log.last() for name, log in trainee.logs.items() if log.lines}
  statuses = _statuses(groups, states, trainee.warnings)
  frozen = {name: s["detail"] for name, s in statuses.items() if s["status"] == "frozen"}
  if jax.process_index() == 0:
    jsonio.write_json(workdir / "summary.json", _summary(groups, statuses, last_lines, end.done))
    for g in groups:
      for m in g.members:
        jsonio.write_json(member_dir(workdir, m) / STATUS_NAME, statuses[m.name])
    if config.sweep.report and not end.preempted:
      from jsae import report  # matplotlib only when a report is wanted
      report.write_report([member_dir(workdir, m) for g in groups for m in g.members],
                          workdir / "report")
  return SweepResult(states=states, groups=groups, metrics=trainee.metrics, steps=end.done,
                     workdir=Path(str(workdir)), preempted=end.preempted, frozen=frozen,
                     unhealthy=dict(trainee.warnings))


def _resolve_recipes(groups: tuple[Group, ...], source, num_steps: int) -> tuple[Group, ...]:
  """The groups with recipe 'auto''s values written into every member's config, derived
  once per group from its compiled config (its first member's seed: members share the
  group's initial threshold); a member's own values set by hand (a swept lr) win."""
  out = []
  for g in groups:
    if g.config.get("recipe", "gemma_scope") != "auto":
      out.append(g)
      continue
    b_dec = loop.initial_b_dec(g.config, source) if g.config.sae.init_b_dec == "mean" else None
    values = train.recipe_values(g.config, source, num_steps, b_dec)
    members = tuple(dataclasses.replace(m, config=recipe.apply(
        m.config, {**values, **recipe.set_by_hand(m.config)})) for m in g.members)
    out.append(dataclasses.replace(g, members=members, config=g.family.group_config(
        [m.config for m in members])))
  return tuple(out)


def _abstract_groups(groups, mesh, base, num_steps) -> tuple[dict, dict]:
  """({group: abstract GroupState}, {group: its NamedShardings}); ConfigError when a group
  does not split over the mesh."""
  abstracts, shardings = {}, {}
  for g in groups:
    sharding.check_divisible(mesh, d_sae=g.config.sae.d_sae, batch_size=base.data.batch_size)
    if len(g.members) % mesh.shape["sweep"]:
      raise _field_error(g.name, "swept", f"{len(g.members)} members do not split over"
                         f" config.mesh.sweep={mesh.shape['sweep']}; use a member count that"
                         " is a multiple of it, or config.mesh.sweep=1.")
    abstracts[g.name] = jax.eval_shape(lambda g=g: init_group(g, total_steps=num_steps))
    shardings[g.name] = sharding.named(mesh, group_specs(abstracts[g.name], g.family))
  return abstracts, shardings


def _init_groups(groups, shardings: dict, source, num_steps: int) -> dict:
  """{group: GroupState} at step 0, sharded (the data mean read once per batch count)."""
  states, b_decs = {}, {}
  for g in groups:
    b_dec = None
    if g.config.sae.init_b_dec == "mean":
      n = g.config.sae.init_b_dec_batches
      b_decs.setdefault(n, loop.initial_b_dec(g.config, source))
      b_dec = b_decs[n]
    states[g.name] = jax.jit(functools.partial(init_group, g, total_steps=num_steps),
                             out_shardings=shardings[g.name])(b_dec=b_dec)
  return states


def _compile(config, groups, mesh, shardings: dict, batch_sharding, source,
             num_steps: int) -> tuple[dict, dict]:
  """({group: members' traced values}, {group: {with_metrics: jitted group_step}})."""
  hparams, step_fns = {}, {}
  member_loop_ = member_loop(config, mesh.shape.get("sweep", 1))
  for g in groups:
    hparams[g.name] = jax.device_put(group_hyperparams(g), jax.sharding.NamedSharding(
        mesh, P("sweep")))
    settings = train.StepSettings.from_config(g.config, source.norm_scale,
                                              getattr(source, "target_norm_scale", None))
    step_fns[g.name] = {
        wm: jax.jit(functools.partial(group_step, settings=settings, optim_config=g.config.optim,
                                      total_steps=num_steps, with_metrics=wm,
                                      loop=member_loop_),
                    in_shardings=(shardings[g.name], batch_sharding, None),
                    out_shardings=(shardings[g.name], None), donate_argnums=0)
        for wm in (False, True)}
  return hparams, step_fns


__all__ = ["Group", "GroupState", "MAX_UPDATE_RATIO", "Member", "SweepResult", "check_fits",
           "group", "group_hyperparams", "group_step", "init_group", "latent_cells",
           "member_config", "member_dir", "member_state", "member_status", "member_statuses",
           "plan", "sweep", "sweep_bytes", "sweep_config"]
