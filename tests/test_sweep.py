"""Sweeps: a vmapped group step equals separate single runs, each batch is read once,
resume is bit for bit, a diverging member is frozen alone, and bad grids are refused."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jsae
from configs import sweep_tiny, tiny_jumprelu
from jsae import config as config_lib
from jsae import data, saes, sharding, sweep, train

REPO = Path(__file__).resolve().parent.parent
STEPS = 20


def _config(families="jumprelu+topk", steps=STEPS, swept=None, mode="grid"):
  """sweep_tiny.py over `families`, two members a group unless `swept` says otherwise."""
  c = sweep_tiny.get_config(f"families={families}")
  c.train.num_tokens = steps * c.data.batch_size
  c.ckpt.every_steps = 10
  c.train.log_every = 10
  c.mesh.data = c.mesh.model = 1
  c.sweep.report = False
  for name, g in c.sweep.groups.items():
    g.mode = mode
    for field, values in (swept or {}).get(name, {k: v[::2] for k, v in g.swept.items()}).items():
      g.swept[field] = tuple(values)
  return c


def _assert_close(a, b, what, tol=1e-6):
  """Every leaf of `a` equals `b` within `tol` of the leaf's largest magnitude."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * max(np.abs(y).max(), 1e-30),
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")


class _CountingSource:
  """Wraps a source, counting the batches read and optionally raising at one step."""

  def __init__(self, inner, crash_at=None):
    self.inner, self.crash_at, self.reads = inner, crash_at, []
    self.d_in, self.batch_size, self.norm_scale = inner.d_in, inner.batch_size, inner.norm_scale

  def batch(self, step):
    if step == self.crash_at:
      raise KeyboardInterrupt("simulated preemption")
    self.reads.append(step)
    return self.inner.batch(step)

  def close(self):
    self.inner.close()


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
  """`train.train` of a config, run once per config for the module: both member loops'
  members are the same twelve single runs (the `sweep` section, which holds the loop,
  is not part of what a single run trains)."""
  root, done = tmp_path_factory.mktemp("single"), {}

  def run(config):
    key = json.dumps({k: v for k, v in config.to_dict().items() if k != "sweep"},
                     sort_keys=True, default=str)
    if key not in done:
      done[key] = train.train(config, root / str(len(done)), progress=False)
    return done[key]

  return run


@pytest.mark.parametrize("member_loop", ["vmap", "map"])
def test_every_family_equals_its_single_runs_and_reads_each_batch_once(tmp_path, member_loop,
                                                                      single_run):
  """Six families, two members each (k swept for the TopK kinds; seed, lr and
  bandwidth zipped for JumpReLU), against twelve `train.train` runs, with the members
  batched (vmap) or one after another in the step (map)."""
  c = _config("+".join(sweep_tiny.KNOBS))
  c.sweep.member_loop = member_loop
  c.ckpt.every_steps = STEPS  # the final checkpoint only: 24 fewer Orbax saves
  c.sweep.groups.jumprelu = sweep.group(
      tiny_jumprelu.get_config(), {"sparsity_coeff": (0.04, 0.01), "seed": (0, 7),
                                   "lr": (2e-3, 1e-3), "bandwidth": (0.05, 0.1)}, mode="zip")
  source = _CountingSource(data.make_source(c))
  result = sweep.sweep(c, tmp_path / "sweep", progress=False, source=source)
  # 12 SAEs, one read per step, and JumpReLU's recipe 'auto' reading batch 0 at init.
  assert sorted(source.reads) == [0] + list(range(STEPS))

  members = [(g, m) for g in result.groups for m in g.members]
  assert len(members) == 12
  assert {m.values["k"] for g, m in members if g.name == "topk"} == {4, 9}
  for g, m in members:
    single = single_run(m.config)
    swept = sweep.member_state(result.states[g.name], m, g.family)
    # vmap: within 1e-6. map: the step's matmuls inside lax.map's loop round a little
    # differently from a top-level step (measured 2e-7 to 1.5e-6 after 20 steps), and
    # BatchTopK's batch-wide cut can flip one latent on such noise (measured 1.6e-3).
    tol = 1e-6 if member_loop == "vmap" else 5e-3 if g.name == "batchtopk" else 1e-5
    _assert_close(swept.params, single.state.params, f"{m.name} params", tol)
    _assert_close(swept.opt_state, single.state.opt_state, f"{m.name} opt_state",
                  max(tol, 1e-5) if member_loop == "map" else tol)
    # The member's metrics line is the single run's (same step, same numbers).
    line = json.loads((result.workdir / "members" / m.name / "metrics.jsonl")
                      .read_text().splitlines()[-1])
    assert line["step"] == STEPS
    assert line["fvu"] == pytest.approx(single.metrics["fvu"], rel=max(1e-4, tol))


def test_at_sweep_tinys_length_members_match_their_single_runs_in_distribution(tmp_path):
  """The README's statement at 1000 steps (configs/sweep_tiny.py's length): parameters may
  drift apart (rounding grown through training, selection flips), but each member's
  held-out FVU is within 0.02 and its L0 within 0.1 of its single run's."""
  c = sweep_tiny.get_config("families=jumprelu")
  c.mesh.data = c.mesh.model = 1
  c.sweep.report = False
  c.ckpt.every_steps = 1000
  assert c.train.num_tokens // c.data.batch_size == 1000
  result = sweep.sweep(c, tmp_path / "sweep", progress=False)
  (g,) = result.groups
  source = data.make_source(g.config)
  held_out = np.concatenate([np.asarray(source.batch(20_000 + i)) for i in range(8)])

  def fvu_l0(params, state):
    sae = jsae.SAE.from_training(params, source.norm_scale, state=state)
    f = np.asarray(sae.encode(held_out))
    err = np.sum((held_out - np.asarray(sae.decode(f))) ** 2)
    return err / np.sum((held_out - held_out.mean(0)) ** 2), (f != 0).sum(-1).mean()

  for m in g.members:
    single = train.train(m.config, tmp_path / m.name, progress=False)
    swept = sweep.member_state(result.states[g.name], m, g.family)
    (fvu_a, l0_a), (fvu_b, l0_b) = (fvu_l0(swept.params, swept.family_state),
                                    fvu_l0(single.state.params, single.state.family_state))
    print(f"{m.name}: FVU {fvu_a:.4f} vs {fvu_b:.4f}, L0 {l0_a:.3f} vs {l0_b:.3f}")
    assert abs(fvu_a - fvu_b) <= 0.02 and abs(l0_a - l0_b) <= 0.1


def test_killed_sweep_resumes_bit_for_bit(tmp_path):
  c = _config()
  straight = sweep.sweep(c, tmp_path / "straight", progress=False)
  crashing = _CountingSource(data.make_source(c), crash_at=13)
  with pytest.raises(KeyboardInterrupt):
    sweep.sweep(c, tmp_path / "resumed", progress=False, source=crashing)
  rerun = _CountingSource(data.make_source(c))
  resumed = sweep.sweep(c, tmp_path / "resumed", progress=False, source=rerun)
  # From the step-10 checkpoint, after recipe 'auto' derives JumpReLU's values again
  # from batch 0 (the same values: they are a function of the seed and the data).
  assert rerun.reads == [0] + list(range(10, STEPS))
  for name in straight.states:
    for a, b in zip(jax.tree.leaves(straight.states[name]), jax.tree.leaves(resumed.states[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  m = resumed.groups[0].members[0]
  steps = [json.loads(l)["step"] for l in
           (resumed.workdir / "members" / m.name / "metrics.jsonl").read_text().splitlines()]
  assert steps == [10, 20]
  # Each member directory is a single run that `train` resumes and `export` reads.
  assert train.train(m.config, resumed.workdir / "members" / m.name, progress=False).steps == STEPS


def test_damaged_newest_sweep_checkpoint_falls_back(tmp_path, capsys):
  c = _config()
  straight = sweep.sweep(c, tmp_path / "straight", progress=False)
  short = _config(steps=STEPS)
  short.train.num_tokens = 20 * short.data.batch_size
  sweep.sweep(short, tmp_path / "resumed", progress=False)
  for f in (tmp_path / "resumed/checkpoints/20/state").rglob("d/*"):
    f.write_bytes(f.read_bytes()[:8])  # truncated: a crash mid-copy
  rerun = _CountingSource(data.make_source(c))
  resumed = sweep.sweep(c, tmp_path / "resumed", progress=False, source=rerun)
  assert "damaged" in capsys.readouterr().out and rerun.reads == [0] + list(range(10, STEPS))
  assert (tmp_path / "resumed/damaged_checkpoints/20").is_dir()
  for name in straight.states:
    for a, b in zip(jax.tree.leaves(straight.states[name]), jax.tree.leaves(resumed.states[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_diverging_member_is_frozen_and_the_others_are_unchanged(tmp_path):
  values = {"sparsity_coeff": (0.04, 0.02, 0.01), "lr": (2e-3, float("inf"), 1e-3)}
  c = _config("jumprelu", swept={"jumprelu": values}, mode="zip")
  result = sweep.sweep(c, tmp_path / "with", progress=False)
  good = {k: (v[0], v[2]) for k, v in values.items()}
  without = sweep.sweep(_config("jumprelu", swept={"jumprelu": good}, mode="zip"), tmp_path / "without",
                        progress=False)
  (g,) = result.groups
  bad = g.members[1]
  assert list(result.frozen) == [bad.name] and "frozen at step 0" in result.frozen[bad.name]
  frozen_state = sweep.member_state(result.states["jumprelu"], bad, g.family)
  assert int(frozen_state.step) == 0  # its last good state: the initialisation
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(frozen_state.params))
  for m, other in zip((g.members[0], g.members[2]), without.groups[0].members):
    a = sweep.member_state(result.states["jumprelu"], m, g.family)
    b = sweep.member_state(without.states["jumprelu"], other, g.family)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  summary = json.loads((result.workdir / "summary.json").read_text())
  assert [m["status"] for m in summary["members"]][1].startswith("frozen")


def test_exploding_members_are_frozen_at_a_healthy_state_that_exports(tmp_path):
  """lr 1e30 and 1e6 blow up without NaN at first (parameters near 1e29, W_dec rows
  renormalised to 0); the update is refused, so the frozen state is the initialisation,
  which exports and loads back. The member's status and eval.json say so."""
  values = {"sparsity_coeff": (0.02,), "lr": (2e-3, 1e30, 1e6)}
  c = _config("jumprelu", swept={"jumprelu": values}, mode="zip")
  result = sweep.sweep(c, tmp_path / "sw", progress=False)
  (g,) = result.groups
  assert sorted(result.frozen) == sorted([g.members[1].name, g.members[2].name])
  init = jax.device_get(sweep.init_group(g, total_steps=STEPS))
  for m in g.members[1:]:
    frozen = sweep.member_state(result.states["jumprelu"], m, g.family)
    assert int(frozen.step) == 0
    for a, b in zip(jax.tree.leaves(frozen.params),
                    jax.tree.leaves(jax.tree.map(lambda x, i=m.index: x[i], init.members.params))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    member = result.workdir / "members" / m.name
    assert json.loads((member / "status.json").read_text())["status"] == "frozen"
    out = jsae.formats.export(member, tmp_path / f"out_{m.index}", "jsae")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jsae.load(out)))
  ok = result.workdir / "members" / g.members[0].name
  assert json.loads((ok / "status.json").read_text()) == {"status": "ok"}
  # `jsae eval --sae=SWEEP` reads these to leave the frozen members out; a folder under
  # members/ that the sweep did not plan (another run's) is not one of them.
  (result.workdir / "members" / "stale-member").mkdir()
  statuses = sweep.member_statuses(result.workdir)
  assert [statuses[m.name]["status"] for m in g.members] == ["ok", "frozen", "frozen"]
  assert sorted(statuses) == sorted(m.name for m in g.members)


def test_export_refuses_non_finite_parameters(tmp_path):
  sae = jsae.SAE.from_training(
      saes.get("jumprelu").init(jax.random.key(0), d_in=8, d_sae=16), 1.0)
  bad = sae.replace(params=sae.params.replace(b_enc=sae.params.b_enc.at[3].set(np.inf)))
  with pytest.raises(jsae.formats.FormatError, match=r"b_enc hold non-finite.*--step"):
    jsae.save(bad, tmp_path / "x", "jsae")
  assert not (tmp_path / "x").exists()


def test_member_failing_without_nan_is_warned_about_and_marked(tmp_path, capsys):
  """The single run's health checks apply to each member: at lr 0.3 a member's FVU
  passes 9 at step 20 (its updates stay under the freeze limit), and it is warned about
  once, marked unhealthy in its status and the summary; the other member is ok."""
  c = _config("jumprelu", steps=30, mode="zip", swept={"jumprelu": {
      "sparsity_coeff": (0.02, 50.0), "lr": (2e-3, 0.3)}})
  c.loss.dead_window_steps = 10
  c.optim.warmup_steps = 5
  result = sweep.sweep(c, tmp_path, progress=False)
  bad = "jumprelu-lr=0.3-sparsity_coeff=50"
  assert not result.frozen and list(result.unhealthy) == [bad]
  assert "worse than the data's mean" in result.unhealthy[bad]
  out = capsys.readouterr().out
  assert out.count(f"warning: sweep member {bad}: FVU") == 1
  status = json.loads((tmp_path / "members" / bad / "status.json").read_text())
  assert status["status"] == "unhealthy" and "FVU" in status["detail"]
  summary = {m["name"]: m["status"] for m in json.loads((tmp_path / "summary.json").read_text())[
      "members"]}
  assert summary["jumprelu-lr=0.002-sparsity_coeff=0.02"] == "ok" and "FVU" in summary[bad]


def test_a_resumed_sweep_says_where_it_resumes(tmp_path, capsys):
  c = _config("topk", steps=10)
  sweep.sweep(c, tmp_path, progress=False)
  c.train.num_tokens = 20 * c.data.batch_size
  sweep.sweep(c, tmp_path, progress=False)
  assert "resuming the sweep from step 10 of 20" in capsys.readouterr().out


def test_sweep_over_a_sweep_data_model_mesh_matches_one_device(tmp_path):
  c = _config("topk")
  c.sweep.member_loop = "vmap"  # on both sides: this compares meshes, not loops
  one = sweep.sweep(c, tmp_path / "one", progress=False)
  c.mesh.sweep, c.mesh.data, c.mesh.model = 2, 2, 2
  meshed = sweep.sweep(c, tmp_path / "mesh", progress=False)
  leaf = meshed.states["topk"].members.params.W_dec
  assert leaf.sharding.spec[0] == "sweep" and len(leaf.sharding.device_set) == 8
  _assert_close(meshed.states["topk"].members.params, one.states["topk"].members.params, "W")


@pytest.mark.parametrize("change,message", [
    (lambda c: c.sweep.groups.topk.swept.update(k_aux=(16, 32)),
     r"groups.topk.swept.k_aux: sae.k_aux is a static .* give each value a group of its own"),
    (lambda c: c.sweep.groups.topk.swept.update(d_sae=(128, 256)),
     r"groups.topk.swept.d_sae: sae.d_sae is a static"),
    (lambda c: c.sweep.groups.topk.swept.update(k=(4, 4)), r"both named 'topk'"),
    (lambda c: c.sweep.groups.topk.swept.update(lrr=(1.0,)), r"'lrr' is not a field"),
    (lambda c: setattr(c.sweep.groups.topk, "mode", "zip") or c.sweep.groups.topk.swept.update(
        seed=(0, 1, 2)), r"zip"),
    (lambda c: c.sweep.groups.topk.swept.update(k=(4, 0)), r"sweep member .*k"),
])
def test_bad_grids_are_refused_before_compiling(change, message):
  c = _config("topk")
  change(c)
  with pytest.raises(config_lib.ConfigError, match=message):
    sweep.plan(c)


def test_sweep_larger_than_memory_and_changed_grid_are_refused(tmp_path):
  c = _config("topk")
  (g,) = sweep.plan(c)
  mesh = sharding.make_mesh(c.mesh, sweep=1)
  need = sum(sweep.sweep_bytes(
      (g,), {g.name: jax.eval_shape(lambda: sweep.init_group(g, total_steps=STEPS))},
      mesh.shape))
  c.sweep.memory_limit_gb = 0.75 * need / 2**30  # room for one of the two members
  with pytest.raises(config_lib.ConfigError,
                     match=r"groups.topk: .* \(config.sweep.memory_limit_gb\); group 'topk' has"
                     r" 2 members and about 1 fit"):
    sweep.sweep(c, tmp_path / "small", progress=False)
  assert not (tmp_path / "small/checkpoints").exists() or not list(
      (tmp_path / "small/checkpoints").iterdir())
  c = _config("topk", steps=10)
  sweep.sweep(c, tmp_path / "run", progress=False)
  c.sweep.groups.topk.swept.k = (4, 6)
  with pytest.raises(config_lib.ConfigError, match=r"groups.topk.swept: the checkpoint's members"
                     r".*new --workdir"):
    sweep.sweep(c, tmp_path / "run", progress=False)


def _jsae(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "jsae.cli", *args], cwd=cwd, text=True,
                        capture_output=True, timeout=300)


def test_cli_sweep_writes_members_summary_and_report(tmp_path):
  run = _jsae("sweep", "--config=configs/sweep_tiny.py:families=topk+relu",
              f"--workdir={tmp_path}/sw", "--config.train.num_tokens=20480",
              "--config.mesh.data=1")
  assert run.returncode == 0, run.stderr
  assert "trained 6 SAEs, 40 steps" in run.stdout
  summary = json.loads((tmp_path / "sw/summary.json").read_text())
  assert sorted(m["name"] for m in summary["members"]) == [
      "relu-sparsity_coeff=0.3", "relu-sparsity_coeff=0.6", "relu-sparsity_coeff=1.2",
      "topk-k=4", "topk-k=6", "topk-k=9"]
  assert all(m["metrics"]["step"] == 40 for m in summary["members"])
  assert (tmp_path / "sw/report/index.html").is_file()
  export = _jsae("export", f"{tmp_path}/sw/members/topk-k=9", f"{tmp_path}/out",
                 "--format=saelens")
  assert export.returncode == 0, export.stderr
  assert json.loads((tmp_path / "out/cfg.json").read_text())["k"] == 9
  single = _jsae("sweep", "--config=configs/tiny.py", f"--workdir={tmp_path}/x")
  assert single.returncode == 2 and "needs a sweep config" in single.stderr
  assert "Traceback" not in single.stderr


def test_gemma3_comparison_config_plans_every_family_at_each_site():
  """configs/sweep_gemma3.py (docs/results.md): 17 members of five families, d_in the
  site's width (640 for the residual stream and MLP output, 4 x 256 heads for attn_z)."""
  from configs import sweep_gemma3
  for site, d_in in (("resid_post.6", 640), ("mlp_out.6", 640), ("attn_z.6", 1024)):
    groups = sweep.plan(sweep_gemma3.get_config(f"site={site}"))
    assert sorted(g.name for g in groups) == ["batchtopk", "gated", "jumprelu", "relu", "topk"]
    assert sum(len(g.members) for g in groups) == 17
    for g in groups:
      assert g.config.sae.d_in == d_in and g.config.lm.site == site
      assert g.config.data.shards_dir == f"runs/acts/activations/train/{site}"
      # The held-out split beside it: held-out checks run instead of being skipped.
      assert g.config.data.eval_shards_dir == f"runs/acts/activations/eval/{site}"
  assert sweep.plan(sweep_gemma3.get_config("eval_shards=x"))[0].config.data.eval_shards_dir == "x"
  with pytest.raises(ValueError, match="unknown config argument"):
    sweep_gemma3.get_config("layer=6")


def test_member_loop_resolution():
  c = _config()
  assert c.sweep.member_loop == "auto"
  assert sweep.member_loop(c) == ("map" if jax.default_backend() == "cpu" else "vmap")
  assert sweep.member_loop(c, sweep_axis=2) == "vmap"  # members sharded: batched
  c.sweep.member_loop = "loop"
  with pytest.raises(config_lib.ConfigError, match="member_loop.*'loop'"):
    sweep.member_loop(c)


def test_auto_sparse_step_is_dense_in_a_sweep_and_an_explicit_capacity_is_kept():
  """Under vmap the sparse step's dense fallback (lax.cond) runs both paths, so 'auto'
  (-1) plans the vmapped step dense; the members' own configs (single runs) keep auto."""
  from configs import sweep_gemma3
  c = sweep_gemma3.get_config("site=resid_post.6")
  c.sae.d_sae = 16384  # wide enough that a single TopK run at k <= 128 goes sparse
  groups = {g.name: g for g in sweep.plan(c)}
  topk = groups["topk"]
  assert topk.config.sae.sparse_capacity == 0
  assert topk.family.settings(topk.config).sparse_capacity == 0
  member = topk.members[0].config
  assert member.sae.sparse_capacity == -1
  assert topk.family.settings(member).sparse_capacity == member.sae.k  # sparse alone
  c.sweep.groups.topk.sae.sparse_capacity = 128  # explicit: the user's choice stands
  (topk,) = [g for g in sweep.plan(c) if g.name == "topk"]
  assert topk.config.sae.sparse_capacity == 128
