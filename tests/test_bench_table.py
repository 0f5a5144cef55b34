"""The performance table: measurement records, merging a rerun, rendering machines as columns."""

import json

import pytest

from bench import run, table
from bench.measurement import Measurement, at_least, machine_slug


def _m(bench="eval", name="delta LM loss", shape="8x1024", tps=63.0, base=205.0,
       machine="CPU X, 2 cores", target="", met=None, detail=""):
  return Measurement(bench=bench, name=name, shape=shape, tokens_per_s=tps, baseline="fwd",
                     baseline_tokens_per_s=base, ratio=None if base is None else tps / base,
                     machine=machine, target=target, met=met, detail=detail)


def _record(machine, measurements, commands=None):
  return dict(machine=machine, measured="2026-12-03", commit="abc", jax="0.10",
              source="test", commands=commands or {}, measurements=measurements)


def test_measurement_json_round_trip_and_nan_as_null():
  m = _m(tps=float("nan"))
  line = m.to_json()
  assert json.loads(line)["tokens_per_s"] is None
  back = Measurement.from_json(_m().to_json())
  assert back == _m()


def test_measurement_from_json_names_missing_and_unknown_fields():
  record = json.loads(_m().to_json())
  del record["ratio"]
  with pytest.raises(ValueError, match="lacks.*ratio"):
    Measurement.from_json(json.dumps(record))
  record = {**json.loads(_m().to_json()), "speed": 1}
  with pytest.raises(ValueError, match="unknown.*speed"):
    Measurement.from_json(json.dumps(record))


def test_at_least_and_slug():
  assert at_least(0.31, 0.3) == ("ratio >= 0.3", True)
  assert at_least(1.75, 2) == ("ratio >= 2", False)
  assert at_least(None, 2) == ("ratio >= 2", None)
  assert machine_slug("CPU AMD EPYC, 2 cores") == "cpu-amd-epyc-2-cores"
  assert machine_slug("NVIDIA H200 x1") == "nvidia-h200-x1"


def test_merge_replaces_only_the_benchmarks_that_ran():
  old = _record("cpu", [_m(bench="eval", tps=10.0), _m(bench="sweep", name="8 SAEs")],
                commands={"eval": ["bench/eval.py"], "sweep": ["bench/sweep.py"]})
  new = _record("cpu", [_m(bench="eval", tps=63.0)], commands={"eval": ["bench/eval.py -x"]})
  merged = table.merge(old, new)
  by_bench = {m.bench: m for m in merged["measurements"]}
  assert by_bench["eval"].tokens_per_s == 63.0  # replaced
  assert by_bench["sweep"].name == "8 SAEs"     # kept
  assert merged["commands"] == {"sweep": ["bench/sweep.py"], "eval": ["bench/eval.py -x"]}
  assert len(merged["measurements"]) == 2
  assert table.merge(None, new) is new


def test_save_load_round_trip(tmp_path):
  record = _record("CPU X, 2 cores", [_m(), _m(bench="sweep", base=None)])
  table.save(tmp_path / "a.json", record)
  assert table.load(tmp_path / "a.json") == record
  (tmp_path / "bad.json").write_text('{"machine": "x"}')
  with pytest.raises(ValueError, match="bad.json.*python -m bench"):
    table.load(tmp_path / "bad.json")


def test_render_puts_machines_in_columns_and_marks_targets():
  cpu = _record("CPU X, 2 cores", [
      _m(target="ratio >= 0.3", met=True),
      _m(bench="train_step", name="sparse L0 50", tps=175.0, base=100.0,
         target="ratio >= 2", met=False, detail="capacity 256")],
      commands={"eval": ["bench/eval.py --contexts 8"]})
  gpu = _record("NVIDIA H200 x1", [_m(machine="NVIDIA H200 x1", tps=5000.0, base=9000.0)])
  md = table.render([gpu, cpu])
  lines = md.splitlines()
  # CPU columns first, whatever the order of the files.
  assert lines.index("| CPU X, 2 cores | 2026-12-03 | abc | 0.10 | test |") < lines.index(
      "| NVIDIA H200 x1 | 2026-12-03 | abc | 0.10 | test |")
  # train_step's table comes before eval's (BENCH_ORDER), each under its own heading.
  assert md.index("## `train_step`") < md.index("## `eval`")
  eval_row = next(l for l in lines if l.startswith("| delta LM loss | 8x1024 |"))
  cells = [c.strip() for c in eval_row.strip("|").split("|")]
  assert cells == ["delta LM loss", "8x1024", "fwd", "63", "0.31 (met)", "",
                   "5,000", "0.56", ""]
  sparse_row = next(l for l in lines if l.startswith("| sparse L0 50 |"))
  assert "**1.75 (NOT met)**" in sparse_row and "capacity 256" in sparse_row
  assert "- CPU X, 2 cores: `bench/eval.py --contexts 8`" in lines
  assert "Targets: ratio >= 2." in lines


def test_render_dir_errors_without_results(tmp_path):
  with pytest.raises(ValueError, match="no results"):
    table.render_dir(tmp_path, tmp_path / "out.md")


def test_suite_selection():
  names = [name for name, _ in run.suite(False, {"eval", "train_step"})]
  assert names == ["train_step"] * 3 + ["eval"]  # dense, sparse JumpReLU, sparse TopK kinds
  with pytest.raises(ValueError, match="unknown benchmark.*nope"):
    run.suite(False, {"nope"})
  assert run.command("eval", "--contexts 8")[1:] == ["bench/eval.py", "--contexts", "8",
                                                      "--json"]
  # Every benchmark the suites name exists.
  for name, _ in run.CPU_SUITE + run.ACCELERATOR_SUITE:
    assert (run.ROOT / "bench" / f"{name}.py").is_file()
