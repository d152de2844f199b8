"""benchmarks/kernels.py runs on CPU (--smoke: tiny shapes, interpret mode, the GPU variant) and reports
what it promises: one table, and a JSON report whose numbers follow from its own measurements."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark():
  spec = importlib.util.spec_from_file_location("kernels_benchmark", ROOT / "benchmarks" / "kernels.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_run_prints_a_table_and_writes_json(tmp_path, capsys):
  bench = load_benchmark()
  out = tmp_path / "kernels.json"
  assert bench.main(["--smoke", "--tokens", "16", "--no-block", "--cases", "indexer_scores", "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "GPU variant, interpret mode" in printed and "indexer_scores fwd+bwd" in printed
  report = json.loads(out.read_text())
  assert report["variant"] == "gpu" and report["interpret"] and report["roofline"] is None
  assert report["shapes"]["tokens"] == 16 and report["shapes"]["ratio"] == 4
  rows = {(r["kernel"], r["impl"]): r for r in report["results"]}
  assert set(rows) == {(k, i) for k in ("indexer_scores fwd", "indexer_scores fwd+bwd") for i in ("pallas", "xla")}
  for (kernel, impl), r in rows.items():
    assert "error" not in r, r
    assert r["ms"] > 0 and math.isclose(r["flops_per_s"], r["flops"] / (r["ms"] / 1e3), rel_tol=1e-9)
  for kernel in ("indexer_scores fwd", "indexer_scores fwd+bwd"):
    pallas = rows[(kernel, "pallas")]
    assert pallas["rel_diff"] <= 2e-2  # bf16 inputs: the kernel agrees with the reference
    assert math.isclose(pallas["speedup"], rows[(kernel, "xla")]["ms"] / pallas["ms"], rel_tol=1e-9)


def test_without_an_accelerator_it_only_explains(capsys):
  assert load_benchmark().main([]) == 0
  assert "needs an accelerator" in capsys.readouterr().out
