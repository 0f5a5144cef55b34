"""The `jsae` command line: `jsae COMMAND [flags]`.

Config flags follow ml_collections: `--config=configs/tiny.py[:arg]` (or just
`--config=tiny` for a file in the repository's configs/) and overrides such as
`--config.optim.lr=3e-4`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

USAGE = """usage: jsae COMMAND [flags]

commands:
  demo    [--workdir=runs/demo] [--config.FIELD=VALUE ...]
          the main job: Gemma 3 270M activations on Shakespeare -> JumpReLU SAE ->
          evaluation -> report (configs/demo.py); a second run reuses finished stages
  harvest --config=CONFIG --workdir=DIR     LM activations -> shards (train and eval)
  train   --config=CONFIG --workdir=DIR     train an SAE; the same workdir resumes it
          [--dry_run]: memory, FLOPs, storage and wall time, nothing read or trained
          [--allow_changes=optim.lr,...]: resume with changed optim/loss fields
  sweep   --config=SWEEP_CONFIG --workdir=DIR   many SAEs in one compiled step per group
          (configs/sweep_tiny.py); members land in DIR/members/NAME as single runs;
          --dry_run as for train (configs/gemma2_9b.py: the paper's 9B sweeps)
  eval    --config=CONFIG --workdir=DIR --sae=RUN_DIR|SAE_DIR|SWEEP_DIR   writes eval.json
  browse  --config=CONFIG --sae=RUN_DIR|SAE_DIR --out=DIR   per-latent top contexts,
          samples, histograms, logit effects: a static site (or --format=neuronpedia)
  export  RUN_DIR OUT [--format=jsae|gemma_scope|gemma_scope_2|saelens] [--layer=L ...]
  report  RUN_DIR... [--out=DIR]            plots and index.html over runs
  shards  info DIR | verify DIR             summarise / checksum activation shards

Config overrides look like --config.optim.lr=3e-4 (see configs/default.py).
--debug (any command): show the traceback of an error instead of one paragraph.

Run `jsae COMMAND --help` for a command's flags.
"""

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class UsageError(ValueError):
  """A command line jsae cannot run; the message says what to type instead."""


def _check_config_file(path: Path) -> None:
  """Raises UsageError for a config file that cannot be one: a syntax error (file and
  line) or no top-level `get_config`."""
  import ast
  try:
    tree = ast.parse(path.read_text(), filename=str(path))
  except SyntaxError as e:
    raise UsageError(f"config file {path}, line {e.lineno}: {e.msg}"
                     + (f": {e.text.strip()}" if e.text else "")
                     + "; fix the file and run again.") from None
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"config file {path} cannot be read ({e}).") from None
  defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
  defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
              if isinstance(t, ast.Name)}
  defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom)
              for a in n.names}
  if "get_config" not in defined:
    raise UsageError(f"config file {path} defines no get_config(); a config file is a"
                     " module with `def get_config(arg=None)` returning an"
                     " ml_collections.ConfigDict, e.g. `from configs import default` and"
                     " `def get_config(arg=None): c = default.get_config(arg); ...; return c`"
                     " (see configs/tiny.py).")


def _resolve_config_arg(args: list[str]) -> list[str]:
  """Rewrites `--config=NAME[:arg]` to a checked path.

  Config files import `configs.default`, which is installed with jsae, so a
  user's own config file works from any directory. A file inside some other
  repository's `configs/` package also finds its siblings: that repository's
  root goes on sys.path.
  """
  out = []
  for a in args:
    if a.startswith("--config="):
      spec = a[len("--config="):]
      file, sep, arg = spec.partition(":")
      path = Path(file)
      if not path.exists() and (REPO_CONFIGS / f"{file}.py").exists():
        path = REPO_CONFIGS / f"{file}.py"
      if not path.is_file():
        raise UsageError(f"config file {file!r} not found; pass a path such as"
                         f" --config=configs/tiny.py or a name from {REPO_CONFIGS}.")
      _check_config_file(path)
      if path.resolve().parent.name == "configs":
        root = str(path.resolve().parent.parent)
        if root not in sys.path:
          sys.path.insert(0, root)
      a = f"--config={path}{sep}{arg}"
    out.append(a)
  return out


def parse_config_flags(prog: str, args: list[str], *, workdir_required: bool = True,
                       default_config: str | None = None, extra: tuple[str, ...] = ()):
  """Parses `--config`, its overrides, `--workdir` and `extra` string flags.

  Returns (config, workdir) or, with `extra`, (config, workdir, {name: value}).
  """
  from absl import flags
  from ml_collections import config_flags

  if default_config and not any(a.startswith("--config=") for a in args):
    args = [f"--config={default_config}"] + list(args)
  args = [prog] + _resolve_config_arg(args)
  fv = flags.FlagValues()
  # sys_argv: config_flags finds the override flags in it (sys.argv by default,
  # which is not these args when main() is called from Python).
  config_flags.DEFINE_config_file("config", None, "experiment config file",
                                  flag_values=fv, lock_config=True, sys_argv=args)
  flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
  for name in extra:
    flags.DEFINE_string(name, None, name, flag_values=fv)
  try:
    fv(args)
  except flags.Error as e:
    raise UsageError(_explain_flag_error(str(e), args)) from None
  except (AttributeError, KeyError) as e:  # config_flags: a field that does not exist
    raise UsageError(_explain_flag_error(f"Could not override: {e}", args)) from None
  if fv.config is None:
    raise UsageError(f"{prog} needs --config=FILE (e.g. --config=configs/tiny.py).")
  if workdir_required and not fv.workdir:
    raise UsageError(f"{prog} needs --workdir=DIR (a new directory, or one to resume).")
  if extra:
    return fv.config, fv.workdir, {name: fv[name].value for name in extra}
  return fv.config, fv.workdir


def _explain_flag_error(message: str, args: list[str] = ()) -> str:
  """One paragraph for a config flag error: the field, whose it is, the fix."""
  if "Error whilst parsing config file" in message:  # get_config raised: keep its last line
    lines = [l for l in message.splitlines() if l.strip()]
    return f"{lines[0].split(':')[0]}: {lines[-1].strip()}"
  if ("Could not override" in message or "not found" in message
      or "Unknown command line flag 'config." in message):
    overrides = [a[len("--"):].split("=", 1)[0] for a in args if a.startswith("--config.")]
    culprit = next((o for o in overrides if f"'{o.split('.')[-1]}" in message
                    or f"'{o}'" in message), None)
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    what = (f"{culprit} does not exist in this config"
            + (f" (did you mean {culprit.rsplit('.', 1)[0]}.{suggestion.group(1)}?)"
               if suggestion else "")
            if culprit else message.replace("\\n", " ").replace("\n", " ")
            + ". That config field does not exist in this config")
    owner = _family_field_owner(args) or _sweep_field_hint(culprit)
    return (f"{what};" + (f" {owner}" if owner else " see configs/default.py for every field")
            + " (overrides look like --config.optim.lr=3e-4).")
  return message


def _sweep_field_hint(culprit: str | None) -> str:
  """How to sweep from the command line, for an override of a group's swept values."""
  if not culprit or ".swept." not in culprit:
    return ""
  group = culprit.split(".swept.")[0].removeprefix("config.")
  return (f"config.{group}.swept lists every field the group can sweep (its family's traced"
          f" knobs, seed and lr; () where not swept); set one as --config.{group}.swept.lr="
          "'(1e-3, 3e-4)'. A shape or static setting cannot be swept inside a group: give each"
          " value a group of its own in the sweep config file")


def _family_field_owner(args) -> str:
  """'config.sae.k is a field of the topk/... families; ...' for an override of a family field."""
  from jsae import saes
  for a in args:
    if not a.startswith("--config.") or "=" not in a:
      continue
    group, _, key = a[len("--config."):].split("=", 1)[0].partition(".")
    owners = [n for n in saes.names() if key in saes.get(n).fields.get(group, {})]
    if owners:
      return (f"config.{group}.{key} is a field of the {'/'.join(owners)} SAE"
              f" famil{'ies' if len(owners) > 1 else 'y'}, not of this config's family. To"
              f" train {owners[0]}, use --config=configs/default.py:family={owners[0]} or"
              f" --config=configs/tiny_{owners[0]}.py")
  return ""


def _dry_run(prog: str, args: list[str]) -> int:
  """`--dry_run`: print what the config costs (memory, FLOPs, storage, wall time); train nothing."""
  from jsae import dryrun
  config, _ = parse_config_flags(prog, [a for a in args if a != "--dry_run"],
                                 workdir_required=False)
  if prog == "jsae sweep" and "sweep" not in config:
    raise UsageError("jsae sweep needs a sweep config (with config.sweep.groups); for one SAE"
                     " use `jsae train --dry_run`.")
  print(dryrun.format_estimate(dryrun.estimate(config)))
  return 0


def _lm_dry_run(prog: str, stage: str, args: list[str]) -> int:
  """`jsae harvest/eval --dry_run`: the LM stage's mesh, memory, FLOPs, disk and wall time
  on each named machine; nothing is read."""
  from jsae import dryrun_lm
  config, _, _ = parse_config_flags(prog, [a for a in args if a != "--dry_run"],
                                    workdir_required=False, extra=("sae", "out", "step"))
  print(dryrun_lm.format_estimate(dryrun_lm.estimate(config, stage)))
  return 0


def cmd_train(args: list[str]) -> int:
  """`jsae train`: train an SAE (resumes when the workdir has a checkpoint)."""
  if _wants_help(args, "usage: jsae train --config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]"
                 " [--dry_run] [--allow_changes=FIELD,...]\n"
                 "  --dry_run: memory, FLOPs, tokens, storage and wall-time estimates"
                 " (no data read, nothing trained)\n"
                 "  --allow_changes=optim.lr,optim.clip_grad_norm: resume the workdir's"
                 " checkpoint although these\n    config.optim / config.loss fields changed"
                 " (e.g. after a divergence); recorded in DIR/history.jsonl"):
    return 0
  if "--dry_run" in args:
    return _dry_run("jsae train", args)
  from jsae import sharding
  sharding.initialize_distributed(label="jsae train")  # before JAX touches devices
  import jax
  from jsae import resume, train
  config, workdir, extra = parse_config_flags("jsae train", args, extra=("allow_changes",))
  allow_changes = resume.parse_allow_changes(extra["allow_changes"], config)
  result = train.train(config, workdir, allow_changes=allow_changes)
  if jax.process_index() != 0:
    return 0
  if result.preempted:
    print(f"stopped by {result.stop_reason} at step {result.steps}; checkpoint saved in"
          f" {result.workdir}; run the same command again to resume")
    return 0
  what = ("already complete: " if result.complete_before else "") + "trained"
  print(f"{what} {result.steps} steps in {result.workdir}: {_metrics_line(result.metrics)}")
  for warning in result.warnings:
    print(f"warning: {warning}")
  return 0


def _metrics_line(m: dict) -> str:
  """'loss 0.1, L0 12.3, FVU 0.045, dead 1.2%' of a run's last record (— where missing)."""
  def fmt(key, spec):
    v = m.get(key)
    return "—" if v is None else format(v, spec)
  return (f"loss {fmt('loss', '.4g')}, L0 {fmt('l0', '.1f')}, FVU {fmt('fvu', '.3f')},"
          f" dead {fmt('dead_frac', '.1%')}")


def cmd_sweep(args: list[str]) -> int:
  """`jsae sweep`: train every member of a sweep config (resumes from the workdir)."""
  if _wants_help(args, "usage: jsae sweep --config=SWEEP_CONFIG --workdir=DIR"
                 " [--config.FIELD=VALUE ...] [--dry_run]\n  e.g. --config=configs/sweep_tiny.py;"
                 " group fields: --config.sweep.groups.NAME.loss.FIELD=V"):
    return 0
  if "--dry_run" in args:
    return _dry_run("jsae sweep", args)
  from jsae import sharding
  sharding.initialize_distributed(label="jsae sweep")
  import jax
  from jsae import sweep
  config, workdir = parse_config_flags("jsae sweep", args)
  if "sweep" not in config:
    raise UsageError("jsae sweep needs a sweep config (with config.sweep.groups), such as"
                     " --config=configs/sweep_tiny.py; for one SAE use `jsae train`.")
  result = sweep.sweep(config, workdir)
  if jax.process_index() != 0:
    return 0
  state = "stopped by SIGTERM at" if result.preempted else "trained"
  print(f"{state} {sum(len(g.members) for g in result.groups)} SAEs,"
        f" {result.steps} steps, in {result.workdir}")
  for name, m in sorted(result.metrics.items()):
    print(f"  {name:40s} L0 {m.get('l0', float('nan')):7.2f}  FVU {m.get('fvu', float('nan')):.4f}")
  for name, status in sorted({**result.unhealthy, **result.frozen}.items()):
    print(f"  {name:40s} {status}")
  print(f"summary: {result.workdir / 'summary.json'}")
  return 0


def cmd_shards(args: list[str]) -> int:
  """`jsae shards info DIR` / `jsae shards verify DIR`."""
  usage = ("usage: jsae shards info DIR | jsae shards verify DIR\n"
           "  info: layout, provenance, normalisation and a size check (exit 1 on a problem)\n"
           "  verify: every shard's checksum (exit 1 on a problem)")
  if _wants_help(args, usage):
    return 0
  if len(args) != 2 or args[0] not in ("info", "verify"):
    raise UsageError(usage)
  from jsae.data import shards
  if args[0] == "info":
    text, problems = shards.inspect(args[1])
    print(text)
    return 1 if problems else 0
  problems = shards.verify(args[1])
  for p in problems:
    print(f"PROBLEM: {p}")
  print("all shards verified" if not problems else f"{len(problems)} problem(s)")
  return 0 if not problems else 1


def _int_flag(name: str, value: str | None) -> int | None:
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise UsageError(f"--{name}={value}: expected a whole number (a checkpoint step).") from None


def _wants_help(args, usage: str) -> bool:
  if "--help" in args or "-h" in args:
    print(usage)
    return True
  return False


def cmd_demo(args: list[str]) -> int:
  """`jsae demo`: the embedded default job end to end (configs/demo.py)."""
  if _wants_help(args, "usage: jsae demo [--workdir=runs/demo] [--config=demo] [--config.FIELD=V]"
                 " [--allow_changes=optim.lr,...]"):
    return 0
  from jsae import pipeline, resume
  config, workdir, extra = parse_config_flags("jsae demo", args, workdir_required=False,
                                              default_config="demo", extra=("allow_changes",))
  pipeline.run(config, workdir or "runs/demo",
               allow_changes=resume.parse_allow_changes(extra["allow_changes"], config))
  return 0


def cmd_harvest(args: list[str]) -> int:
  """`jsae harvest`: LM activations of config.lm.site on config.text -> shards."""
  if _wants_help(args, "usage: jsae harvest --config=CONFIG --workdir=DIR [--config.FIELD=V]"
                 " [--dry_run]\n  --dry_run: the LM mesh, memory per device, FLOPs, disk and"
                 " wall time on each named machine; nothing read or written"):
    return 0
  if "--dry_run" in args:
    return _lm_dry_run("jsae harvest", "harvest", args)
  from jsae import peers, pipeline, sharding
  sharding.initialize_distributed(label="jsae harvest")
  peers.stop_on_signals()  # SIGTERM/Ctrl-C stop every process (a harvest has no checkpoint to sync)
  config, workdir = parse_config_flags("jsae harvest", args)
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  pipeline.check_text_source(config)
  lm = pipeline.load_lm(config)
  contexts, text_source = pipeline.text_contexts(config, lm, workdir)
  dirs = pipeline.harvest_stage(config, lm, contexts, text_source, workdir)
  print("\n".join(f"{split}: {d}" for split, d in dirs.items()))
  return 0


def _load_sae(path: str, step: int | None = None):
  """(SAE, run dir or None) of a training run (its `step`, default the newest intact
  checkpoint) or of an exported SAE."""
  import jsae
  p = Path(path)
  if (p / "checkpoints").is_dir():
    return jsae.runs.read_sae(p, step=step), p
  if step is not None:
    raise UsageError(f"--step is for a training run directory; {path} is an exported SAE.")
  return jsae.load(p), None


def cmd_eval(args: list[str]) -> int:
  """`jsae eval`: evaluate an SAE (run dir or exported) on held-out text; writes eval.json."""
  usage = ("usage: jsae eval --config=CONFIG --workdir=DIR --sae=RUN_DIR|SAE_PATH|SWEEP_DIR"
           " [--out=FILE] [--step=N] [--dry_run]\n"
           "  DIR holds (or receives) the harvested eval activations of config.lm.site;\n"
           "  a SWEEP_DIR (from jsae sweep) evaluates every member, the LM prefix shared")
  if _wants_help(args, usage):
    return 0
  if "--dry_run" in args:
    return _lm_dry_run("jsae eval", "eval", args)
  from jsae import pipeline, sharding
  # Several processes split the contexts and the held-out rows, and add their sums.
  sharding.initialize_distributed(label="jsae eval")  # before JAX touches devices
  import jax
  config, workdir, extra = parse_config_flags("jsae eval", args, extra=("sae", "out", "step"))
  step = _int_flag("step", extra["step"])
  if not extra["sae"]:
    raise UsageError("jsae eval needs --sae=RUN_DIR (a training workdir) or an exported SAE.")
  sweep_dir = Path(extra["sae"])
  if (sweep_dir / "sweep.json").is_file():  # every member, the LM prefix shared
    if extra["out"]:
      raise UsageError("--out is for one SAE; a sweep's members get members/NAME/eval.json.")
    from jsae import sweep
    statuses = sweep.member_statuses(sweep_dir)
    members = [sweep_dir / "members" / name for name in statuses]
    saes = {}
    for p in members:
      status = statuses[p.name]
      if status["status"] == "frozen":  # its state is its last healthy one, not a result
        print(f"  {p.name:40s} not evaluated: {status.get('detail', 'frozen')}")
        continue
      saes[p.name] = (_load_sae(str(p))[0], p / "eval.json")
    if not saes:
      raise UsageError(f"every member of the sweep in {sweep_dir} is frozen; nothing to"
                       " evaluate (see its summary.json).")
  else:
    sae, run_dir = _load_sae(extra["sae"], step)
    out = Path(extra["out"]) if extra["out"] else (run_dir or Path(workdir)) / "eval.json"
    saes = {"": (sae, out)}
  t0 = time.perf_counter()
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  pipeline.check_text_source(config)
  lm = pipeline.load_lm(config)
  contexts, text_source = pipeline.text_contexts(config, lm, workdir)
  dirs = pipeline.harvest_stage(config, lm, contexts, text_source, workdir)
  metrics = pipeline.eval_many_stage(config, lm, saes, contexts, dirs["eval"])
  if jax.process_index() != 0:  # process 0 writes and reports what every process holds
    return 0
  if "" in metrics:
    print(f"wrote {saes[''][1]}\n"
          + pipeline.summary_table(metrics[""], time.perf_counter() - t0))
    return 0
  for name, m in metrics.items():
    status = statuses[name]["status"]
    print(f"  {name:40s} L0 {m['l0']:7.2f}  FVU {m['fvu']:.4f}  delta LM loss"
          f" {m['delta_lm_loss']:.4f}" + ("" if status == "ok" else f"  ({status})"))
  from jsae import report
  index = report.write_report(members, sweep_dir / "report")
  print(f"wrote {len(metrics)} members' eval.json; report: {index}")
  return 0


def cmd_browse(args: list[str]) -> int:
  """`jsae browse`: every latent's top contexts, samples, histogram and logit effects."""
  usage = ("usage: jsae browse --config=CONFIG --sae=RUN_DIR|SAE_DIR --out=DIR"
           " [--workdir=DIR] [--format=site|neuronpedia] [--latents=3,17,...] [--step=N]\n"
           "  streams config.text's held-out split through the LM to config.lm.site and the"
           " SAE;\n  DIR/index.html is a static browser (open it in a browser), or"
           " --format=neuronpedia\n  writes DIR/batch-N.json for a Neuronpedia upload."
           " --workdir caches the tokenised text\n  (default: DIR). config.browse sets what"
           " each page shows (configs/default.py).")
  if _wants_help(args, usage):
    return 0
  from jsae import pipeline, sharding
  from jsae.browse import run as browse_lib
  # Several processes stream shares of the contexts and merge their statistics.
  sharding.initialize_distributed(label="jsae browse")  # before JAX touches devices
  config, workdir, extra = parse_config_flags(
      "jsae browse", args, workdir_required=False,
      extra=("sae", "out", "format", "latents", "step"))
  if not extra["sae"] or not extra["out"]:
    raise UsageError(f"jsae browse needs --sae and --out.\n{usage}")
  try:
    latents = ([int(x) for x in extra["latents"].split(",") if x.strip()]
               if extra["latents"] else None)
  except ValueError:
    raise UsageError(f"--latents={extra['latents']}: expected latent ids such as"
                     " --latents=3,17,42.") from None
  sae, _ = _load_sae(extra["sae"], _int_flag("step", extra["step"]))
  browse_lib.check_latents(latents, sae.d_sae)
  out = Path(extra["out"]).absolute()
  workdir = Path(workdir).absolute() if workdir else out
  workdir.mkdir(parents=True, exist_ok=True)
  pipeline.check_text_source(config)
  lm = pipeline.load_lm(config)
  contexts, text_source = pipeline.text_contexts(config, lm, workdir)
  result = browse_lib.browse(config, sae, lm, contexts["eval"], out,
                             fmt=extra["format"] or "site", text_source=text_source,
                             latents=latents, say=pipeline.say)
  pipeline.say(f"wrote {result.path} ({result.covers}; {result.tokens:,} tokens at"
        f" {result.tokens_per_s:,.0f} tokens/s; logit effects {result.logit_s:.1f}s)")
  return 0


def cmd_export(args: list[str]) -> int:
  """`jsae export RUN_DIR OUT --format=...`: the trained SAE in a release format."""
  usage = ("usage: jsae export RUN_DIR OUT [--format=jsae|gemma_scope|gemma_scope_2|saelens]\n"
           "       [--step=N] [--layer=L --average_l0=N --width=W --l0=N --site=S] [--overwrite]")
  if _wants_help(args, usage):
    return 0
  positional = [a for a in args if not a.startswith("--")]
  if len(positional) != 2:
    raise UsageError(usage)
  options = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "true")
                 for a in args if a.startswith("--"))
  from jsae import formats
  fmt = options.pop("format", "jsae")
  step = _int_flag("step", options.pop("step", None))
  overwrite = options.pop("overwrite", "false") == "true"
  layout = {k: (int(v) if v.isdigit() else v) for k, v in options.items()}
  path = formats.export(positional[0], positional[1], fmt, step=step, overwrite=overwrite,
                        **layout)
  print(f"exported {positional[0]} as {fmt} to {path}")
  return 0


def cmd_report(args: list[str]) -> int:
  """`jsae report RUN_DIR... [--out=DIR]`: plots and index.html."""
  usage = ("usage: jsae report RUN_DIR... [--out=DIR]\n"
           "  RUN_DIR: training workdirs (or sweep members); plots and index.html in DIR")
  if _wants_help(args, usage):
    return 0
  runs = [a for a in args if not a.startswith("--")]
  if not runs:
    raise UsageError(f"jsae report needs at least one run directory.\n{usage}")
  from jsae import report
  out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), "report")
  print(f"wrote {report.write_report(runs, out)}")
  return 0


COMMANDS = {"demo": cmd_demo, "harvest": cmd_harvest, "train": cmd_train, "sweep": cmd_sweep,
            "eval": cmd_eval, "browse": cmd_browse,
            "export": cmd_export, "report": cmd_report, "shards": cmd_shards}


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `jsae` console script; returns the exit code.

  An error the user can fix prints one paragraph (what and the fix) and returns
  2; `--debug` (or JSAE_DEBUG=1) shows the traceback instead. In a multi-process
  run the process then tells the others (`jsae.peers`, which stops them too) and
  exits at once, without JAX's shutdown barrier.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or bool(os.environ.get("JSAE_DEBUG"))
  argv = [a for a in argv if a != "--debug"]
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"jsae: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
  from jsae import peers, user_errors
  try:
    return COMMANDS[command](rest)
  except KeyboardInterrupt as e:
    peers.before_reporting(e)
    print(f"jsae {command}: interrupted", file=sys.stderr)
    _leave_if_multiprocess("was interrupted", 130)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    peers.before_reporting(e)  # multi-process: another process's failure may be the story
    message = user_errors.describe(e)
    if debug or message is None:
      if peers.active():
        import traceback  # pylint: disable=import-outside-toplevel
        traceback.print_exc()
        _leave_if_multiprocess(f"failed: {type(e).__name__}: {user_errors.first_line(str(e))}"
                               " (its log has the traceback)", 1)
      raise
    print(f"jsae {command}: error: {message}\n(--debug shows the traceback)", file=sys.stderr)
    _leave_if_multiprocess(f"failed: {message}", 2)
    return 2


def _leave_if_multiprocess(what: str, code: int) -> None:
  """In a multi-process run, tells the other processes that this one `what` and exits now
  (`jsae.peers.leave`): returning would wait in JAX's shutdown barrier for processes that
  wait for this one."""
  from jsae import peers  # pylint: disable=import-outside-toplevel
  if peers.active():
    peers.leave(f"{peers.describe_process()} {what}", code)


if __name__ == "__main__":
  sys.exit(main())
