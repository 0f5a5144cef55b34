"""The `jsae` command line: `jsae COMMAND [flags]`.

Config flags follow ml_collections: `--config=configs/tiny.py[:arg]` (or just
`--config=tiny` for a file in the repository's configs/) and overrides such as
`--config.optim.lr=3e-4`.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: jsae COMMAND [flags]

commands:
  train   --config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]
          train an SAE; rerunning on the same workdir resumes it
  shards  info DIR | verify DIR
          summarise / checksum an activation-shard directory

Run `jsae COMMAND --help` for a command's flags.
"""

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class UsageError(ValueError):
  """A command line jsae cannot run; the message says what to type instead."""


def _resolve_config_arg(args: list[str]) -> list[str]:
  """Rewrites `--config=NAME[:arg]` to a path, and makes `configs` importable.

  Config files import `configs.default`, so the directory holding `configs/`
  goes on sys.path.
  """
  out = []
  for a in args:
    if a.startswith("--config="):
      spec = a[len("--config="):]
      file, sep, arg = spec.partition(":")
      path = Path(file)
      if not path.exists() and (REPO_CONFIGS / f"{file}.py").exists():
        path = REPO_CONFIGS / f"{file}.py"
      if not path.exists():
        raise UsageError(f"config file {file!r} not found; pass a path such as"
                         f" --config=configs/tiny.py or a name from {REPO_CONFIGS}.")
      root = str(path.resolve().parent.parent)
      if root not in sys.path:
        sys.path.insert(0, root)
      a = f"--config={path}{sep}{arg}"
    out.append(a)
  return out


def parse_config_flags(prog: str, args: list[str], *, workdir_required: bool = True):
  """Parses `--config`, its overrides and `--workdir`; returns (config, workdir)."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config file",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory", flag_values=fv)
  try:
    fv([prog] + _resolve_config_arg(args))
  except flags.Error as e:
    raise UsageError(_explain_flag_error(str(e))) from None
  except (AttributeError, KeyError) as e:  # config_flags: a field that does not exist
    raise UsageError(_explain_flag_error(f"Could not override: {e}")) from None
  if fv.config is None:
    raise UsageError(f"{prog} needs --config=FILE (e.g. --config=configs/tiny.py).")
  if workdir_required and not fv.workdir:
    raise UsageError(f"{prog} needs --workdir=DIR (a new directory, or one to resume).")
  return fv.config, fv.workdir


def _explain_flag_error(message: str) -> str:
  if "Could not override" in message or "not found" in message:
    message = message.replace("\\n", " ").replace("\n", " ")
    return (f"{message}. That config field does not exist; see configs/default.py"
            " for every field (overrides look like --config.optim.lr=3e-4).")
  return message


def cmd_train(args: list[str]) -> int:
  """`jsae train`: train an SAE (resumes when the workdir has a checkpoint)."""
  if "--help" in args or "-h" in args:
    print("usage: jsae train --config=CONFIG --workdir=DIR [--config.FIELD=VALUE ...]")
    return 0
  from jsae import sharding
  sharding.initialize_distributed()  # multi-process runs; before JAX touches devices
  import jax
  from jsae import train
  config, workdir = parse_config_flags("jsae train", args)
  result = train.train(config, workdir)
  if jax.process_index() != 0:
    return 0
  if result.preempted:
    print(f"stopped by SIGTERM at step {result.steps}; checkpoint saved in {result.workdir}")
    return 0
  m = result.metrics
  print(f"trained {result.steps} steps in {result.workdir}: loss {m.get('loss', float('nan')):.4g},"
        f" L0 {m.get('l0', float('nan')):.1f}, FVU {m.get('fvu', float('nan')):.3f},"
        f" dead {m.get('dead_frac', float('nan')):.1%}")
  return 0


def cmd_shards(args: list[str]) -> int:
  """`jsae shards info DIR` / `jsae shards verify DIR`."""
  if len(args) != 2 or args[0] not in ("info", "verify"):
    raise UsageError("usage: jsae shards info DIR | jsae shards verify DIR")
  from jsae.data import shards
  if args[0] == "info":
    text = shards.info(args[1])
    print(text)
    return 1 if "INVALID" in text else 0
  problems = shards.verify(args[1])
  for p in problems:
    print(f"PROBLEM: {p}")
  print("all shards verified" if not problems else f"{len(problems)} problem(s)")
  return 0 if not problems else 1


COMMANDS = {"train": cmd_train, "shards": cmd_shards}


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `jsae` console script."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"jsae: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
  from jsae.config import ConfigError
  try:
    return COMMANDS[command](rest)
  except (UsageError, ConfigError, OSError) as e:
    print(f"jsae {command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"jsae {command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
