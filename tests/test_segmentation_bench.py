"""benchmarks/segmentation.py on the embedded digit scenes at the smoke budget: the table, the
oracle, and a self-training method's per-round pseudo-label quality."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "segmentation.py"


def load():
    spec = importlib.util.spec_from_file_location("_seg_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = mod  # its dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod


def test_smoke_table_with_oracle_and_rounds(tmp_path, capsys):
    bench = load()
    rows = tmp_path / "rows.json"
    assert bench.main(["--pairs", "scenes-tiny", "--methods", "source-only,oracle,cbst", "--budget", "smoke",
                       "--seeds", "0", "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "runs"),
                       "--json", str(rows), "--per-class"]) == 0
    out = capsys.readouterr().out
    for method in ("source-only", "oracle", "cbst"):
        assert f"| {method} | scenes-tiny |" in out
    got = {r["method"]: r for r in json.loads(rows.read_text())}
    assert got["cbst"]["steps"] == 10 + 2 * 5 and len(got["cbst"]["rounds"]) == 2
    for r in got["cbst"]["rounds"]:
        assert 0 < r["density"] <= 1 and 0 <= r["precision"] <= 1
    assert "pseudo-labels per round" in out and "per-class IoU %, oracle on scenes-tiny" in out
    assert 0 <= got["oracle"]["miou"] <= 1 and "rounds" not in got["source-only"]


def test_init_from_source_only_reuses_the_seeds_source_only_run(tmp_path, capsys):
    """--init-from-source-only: the cbst row starts from the seed's source-only run (trained
    first when missing), with no warm-up of its own; a method without a warm-up is unaffected."""
    bench = load()
    rows = tmp_path / "rows.json"
    assert bench.main(["--pairs", "scenes-tiny", "--methods", "cbst,source-only", "--budget", "smoke", "--seeds", "0",
                       "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "runs"), "--json", str(rows),
                       "--init-from-source-only"]) == 0
    got = {r["method"]: r for r in json.loads(rows.read_text())}
    src = tmp_path / "runs" / "source-only_scenes-tiny_smoke_s0"
    assert got["cbst"]["init"] == str(src) and got["cbst"]["steps"] == 2 * 5  # rounds only
    config = json.loads((tmp_path / "runs" / "cbst_scenes-tiny_smoke_init_s0" / "config.json").read_text())
    assert config["options"]["init"] == str(src) and config["config"]["warmup_steps"] == 0
    assert "init" not in got["source-only"]
