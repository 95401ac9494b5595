"""benchmarks/digits.py's smoke budget: every registered method trains and lands in the table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from uda_cli.methods.registry import get_method, list_methods

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str = "digits", folder: str = "benchmarks"):
    """<folder>/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", REPO / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def load_tool(name: str):
    """tools/<name>.py (the probes and batch helpers) as a module."""
    return load_bench(name, "tools")


def one_step_runs(tmp_path, *methods: str) -> list[Path]:
    """A one-step MNIST2000->USPS1800 run of each method, in tmp_path/<method>."""
    from uda_cli.config import TrainOptions
    from uda_cli.engine.trainer import train

    runs = []
    for m in methods:
        runs.append(tmp_path / m)
        train(TrainOptions(method=m, src="mnist2000", tgt="usps1800", steps=1, batch_size=4, out=runs[-1],
                           device="cpu", log_every=1), interactive=False)
    return runs


def table_row(run: Path, capsys) -> list[str]:
    """The one row of the table just printed that starts with the run folder, as stripped cells."""
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith(f"| {run} ")]
    assert len(rows) == 1
    return [c.strip() for c in rows[0].strip("|").split("|")]


def patch_loaded_methods(monkeypatch, patch) -> dict:
    """Make trainer.load_method hand back methods edited by patch(method, kind), where kind is
    read at load time from the returned dict's "kind" (set it before each probe call)."""
    import uda_cli.engine.trainer as trainer

    real_load, mode = trainer.load_method, {}

    def load_with(weights, device):
        method, info = real_load(weights, device)
        patch(method, mode["kind"])
        return method, info

    monkeypatch.setattr(trainer, "load_method", load_with)
    return mode


def refused(main, argv, msg, capsys):
    """main(argv) stops with exit code 2 and a one-line message holding msg, no traceback."""
    import pytest

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and msg in err and "Traceback" not in err


def test_smoke_budget_runs_every_method(tmp_path, capsys):
    import json

    bench = load_bench()
    # the digit pairs: segmentation-only methods (advent) belong to benchmarks/segmentation.py
    methods = [m for m in list_methods() if "classification" in get_method(m).tasks]
    assert set(methods) <= set(bench.BUDGETS), "every method needs benchmark budgets"
    rc = bench.main(["--methods", ",".join(methods), "--pairs", "mnist-usps", "--budget", "smoke", "--device", "cpu",
                     "--batch-size", "8", "--data-root", str(tmp_path / "data"), "--json", str(tmp_path / "rows.json"),
                     "--out", str(tmp_path / "runs")])
    assert rc == 0
    table = capsys.readouterr().out
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    acc_col = header.index("target acc % (mean ± std)")
    rows = [l for l in table.splitlines() if l.startswith("| ") and "MNIST→USPS" in l]
    assert sorted(l.split(" | ")[0].strip("| ") for l in rows) == sorted(methods)
    for line in rows:
        acc = float(line.strip("|").split("|")[acc_col].split(" ± ")[0])
        assert 0.0 <= acc <= 100.0
    # Each run kept mid-run checkpoints (every tenth of its 3 steps: every step), not only its last.
    assert len(list((tmp_path / "runs").glob("*/checkpoints/step-00000002.safetensors"))) == len(methods)
    # Every method's optimizers take torch's fused kernels on cpu, and each row says which ran.
    assert {r["optimizer_kernels"] for r in json.loads((tmp_path / "rows.json").read_text())} == {"fused"}
    rc = bench.main(["--from-json", str(tmp_path / "rows.json")])
    assert rc == 0 and len([l for l in capsys.readouterr().out.splitlines() if "MNIST→USPS" in l]) == len(methods)


def test_set_reaches_the_run_and_the_table_and_a_bad_one_stops_before_any_run(tmp_path, capsys):
    import json

    bench = load_bench()
    common = ["--pairs", "mnist-usps", "--budget", "smoke", "--device", "cpu", "--batch-size", "8",
              "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    refused(bench.main, ["--methods", "i2i", "--set", "grayscal=false", *common], "--set grayscal: unknown hyperparameter",
            capsys)
    assert not (tmp_path / "runs").exists()  # checked before the first run started
    rc = bench.main(["--methods", "i2i", "--set", "lambda_cyc=0", "--control", "--json", str(tmp_path / "rows.json"),
                     *common])
    assert rc == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows[0]["params"] == {"lambda_cyc": 0} and rows[1]["method"] == "source-only @ i2i"
    assert rows[1]["params"] == {}  # the control is plain source-only
    assert "| lambda_cyc=0 |" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "runs" / "i2i_mnist-usps_smoke_b8_lambda_cyc_0_s0" / "config.json").read_text())
    assert cfg["config"]["lambda_cyc"] == 0 and cfg["options"]["params"] == {"lambda_cyc": 0}
    assert (tmp_path / "runs" / "source-only@i2i_mnist-usps_smoke_b8_lambda_cyc_0_s0" / "checkpoints" / "latest").exists()
    # The same settings again into the same --out: refused before the first run, not when its turn comes.
    refused(bench.main, ["--methods", "i2i", "--set", "lambda_cyc=0", "--seeds", "1,0", "--json",
                         str(tmp_path / "again.json"), *common], "i2i_mnist-usps_smoke_b8_lambda_cyc_0_s0 already holds a run",
            capsys)
    assert not (tmp_path / "again.json").exists() and not (tmp_path / "runs" / "i2i_mnist-usps_smoke_b8_lambda_cyc_0_s1").exists()
    # Another setting into the same --out gets its own folder.
    assert bench.main(["--methods", "i2i", "--set", "lambda_cyc=0.5", *common]) == 0
    cfg = json.loads((tmp_path / "runs" / "i2i_mnist-usps_smoke_b8_lambda_cyc_0.5_s0" / "config.json").read_text())
    assert cfg["config"]["lambda_cyc"] == 0.5
    # So does another length: --steps is in the folder name, as --batch-size was above.
    assert bench.main(["--methods", "i2i", "--set", "lambda_cyc=0.5", "--steps", "2", *common]) == 0
    cfg = json.loads((tmp_path / "runs" / "i2i_mnist-usps_smoke_steps2_b8_lambda_cyc_0.5_s0" / "config.json").read_text())
    assert cfg["options"]["steps"] == 2
    refused(bench.main, ["--methods", "i2i", "--seeds", "0,one", *common], "give whole numbers separated by commas",
            capsys)


def test_target_val_holds_target_images_out_of_training_and_reports_them(tmp_path, capsys):
    import json

    bench = load_bench()
    common = ["--methods", "dann", "--pairs", "mnist-usps", "--budget", "smoke", "--device", "cpu", "--batch-size", "8",
              "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    rc = bench.main([*common, "--target-val", "300", "--control", "--json", str(tmp_path / "rows.json")])
    assert rc == 0
    table = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["target_val"] for r in rows] == [300, 300] and all(0 <= r["val_accuracy"] <= 1 for r in rows)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    col = header.index("held-out target val %")
    for r in rows:
        line = next(l for l in table.splitlines() if l.startswith(f"| {r['method']} |"))
        assert line.strip("|").split("|")[col].strip() == f"{100 * r['val_accuracy']:.1f} ± 0.0 (300)"
    for run in ("dann_mnist-usps_smoke_b8_val300_s0", "source-only@dann_mnist-usps_smoke_b8_val300_s0"):
        assert json.loads((tmp_path / "runs" / run / "config.json").read_text())["options"]["tgt"] == "usps1800:train[:-300]"
    report = json.loads(next((tmp_path / "runs" / "dann_mnist-usps_smoke_b8_val300_s0" / "eval").glob("usps1800_train_-300__*")).read_text())
    assert report["num_samples"] == 300
    refused(bench.main, [*common, "--target-val", "5000", "--out", str(tmp_path / "runs2")],
            "usps1800:train[:-5000] reaches past the 1,800 images of usps1800:train", capsys)
    refused(bench.main, [*common, "--target-val", "-3"], "--target-val -3: give a number of images >= 1", capsys)


def test_dtn_probe_reads_a_dtn_run_and_refuses_another_method(tmp_path, capsys):
    bench = load_bench()
    rc = bench.main(["--methods", "dtn", "--control", "--pairs", "mnist-usps", "--budget", "smoke", "--device", "cpu",
                     "--batch-size", "8", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")])
    assert rc == 0
    capsys.readouterr()
    probe = load_tool("dtn_probe")
    run = tmp_path / "runs" / "dtn_mnist-usps_smoke_b8_s0"
    assert probe.main([str(run), "--posthoc-steps", "2"]) == 0
    cells = table_row(run, capsys)
    assert cells[1] == "3" and all(0.0 <= float(v) <= 100.0 for v in cells[2:])
    refused(probe.main, [str(tmp_path / "runs" / "source-only@dtn_mnist-usps_smoke_b8_s0")],
            "is a source-only run; this probe reads dtn runs", capsys)
    refused(probe.main, [str(tmp_path / "nowhere")], "no checkpoint at", capsys)


def test_table_counts_distinct_seeds_and_says_when_a_seed_ran_twice():
    bench = load_bench()
    row = dict(method="dann", pair="MNIST→USPS", pair_key="mnist-usps", budget="cpu", steps=10, batch_size=8,
               params={}, device="cpu", wall_s=1.0, img_s=1.0)
    table = bench.fmt_table([{**row, "seed": 0, "accuracy": 0.5}, {**row, "seed": 0, "accuracy": 0.5},
                             {**row, "seed": 1, "accuracy": 0.7}], "cpu", "cpu")
    line = table.splitlines()[2]
    assert "| 2 (3 runs) |" in line and "56.7 ± 11.5" in line
    one = bench.fmt_table([{**row, "seed": 0, "accuracy": 0.5}, {**row, "seed": 1, "accuracy": 0.7}], "cpu", "cpu")
    assert "| 2 | 60.0 ± 14.1 |" in one.splitlines()[2]
    # A seed's run on the fused optimizer kernels is another line, not a second run of that seed.
    mixed = bench.fmt_table([{**row, "seed": 0, "accuracy": 0.5},
                             {**row, "seed": 0, "accuracy": 0.7, "optimizer_kernels": "fused"}], "cpu", "cpu")
    lines = mixed.splitlines()[2:]
    assert len(lines) == 2 and "| 1 | 50.0 ± 0.0 |" in lines[0] and "| default |" in lines[0]
    assert "| 1 | 70.0 ± 0.0 |" in lines[1] and "| fused |" in lines[1]


def test_from_json_skips_other_readers_rows_and_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    """README's `--from-json benchmarks/results/*.json` also meets a lease's checkpoint reads
    (rows of another shape): they are skipped and said so, never a KeyError."""
    import json

    import pytest

    bench = load_bench()
    row = dict(method="dann", pair="MNIST→USPS", pair_key="mnist-usps", budget="cpu", steps=10, batch_size=8,
               params={}, device="cpu", wall_s=1.0, img_s=1.0, seed=0, accuracy=0.5)
    (tmp_path / "rows.json").write_text(json.dumps([row]))
    (tmp_path / "reads.json").write_text(json.dumps([{"job": "a", "step": 5, "domain": "usps:test", "accuracy": 0.4}]))
    assert bench.main(["--from-json", str(tmp_path / "rows.json"), str(tmp_path / "reads.json")]) == 0
    out, err = capsys.readouterr()
    assert "| 1 | 50.0 ± 0.0 |" in out and "reads.json: skipped 1 of its 1 rows, not digits.py rows" in err
    (tmp_path / "bad.json").write_text("[{")
    (tmp_path / "dict.json").write_text("{}")
    for files, said in ((["bad.json"], "cannot read it as JSON"), (["dict.json"], "a JSON dict, not the list"),
                        (["reads.json"], "no digits.py rows in")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--from-json", *(str(tmp_path / f) for f in files)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and said in err.splitlines()[-1] and "Traceback" not in err


def test_curves_groups_seeds_by_step_from_the_runs_own_logs(tmp_path, capsys, monkeypatch):
    """Two seeds of a tiny run, evaluated every 2 steps, and a resumed longer run: the table
    holds every logged evaluation, grouped by method x pair x settings, with the mean."""
    import json

    from uda_cli.config import TrainOptions
    from uda_cli.engine.trainer import train

    curves = load_tool("curves")

    def run(seed, steps, **kw):
        out = tmp_path / f"s{seed}"
        train(TrainOptions(method="source-only", src="tiny-src", tgt="tiny-tgt", steps=steps, batch_size=8, out=out,
                           seed=seed, device="cpu", save_every=2, eval_every=2, log_every=2, **kw), interactive=False)
        return out

    a, b = run(0, 4), run(1, 2)
    run(1, 4, resume="auto")  # seed 1 continued from step 2 to 4
    logged = {}
    for r in (a, b):
        seed = json.loads((r / "config.json").read_text())["options"]["seed"]
        for line in (r / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "eval":
                logged[(seed, rec["step"])] = 100 * rec["accuracy"]
    assert sorted(logged) == [(0, 2), (0, 4), (1, 2), (1, 4)]

    def table(argv):
        assert curves.main(argv) == 0
        return [[c.strip() for c in l.strip("|").split("|")] for l in capsys.readouterr().out.splitlines()[2:]]

    rows = table([str(a), str(b)])
    assert [r[4] for r in rows] == ["2", "4"]
    assert all(r[:4] == ["source-only", "tiny-src->tiny-tgt", "–", "tiny-tgt:test"] for r in rows)
    for r in rows:
        step = int(r[4])
        want = [logged[(0, step)], logged[(1, step)]]
        assert r[5] == "0,1" and r[6] == f"{want[0]:.1f} / {want[1]:.1f}"
        mean = sum(want) / 2
        assert r[7].startswith(f"{mean:.1f} ± ")

    only = table([str(a), "--steps", "4"])
    assert len(only) == 1 and "| 4 | 0 |" in "| " + " | ".join(only[0]) + " |"

    # --domain: the checkpoints each run kept (steps 2 and 4), evaluated afresh. On the split the
    # runs logged, that is the logged table; on another split, a group of its own.
    import uda_cli.engine.evaluate as evaluate

    reads = []
    real_load = evaluate.load_domain
    monkeypatch.setattr(evaluate, "load_domain", lambda *a, **k: reads.append(a[:2]) or real_load(*a, **k))
    assert table([str(a), str(b), "--domain", "tiny-tgt:test"]) == rows
    assert reads == [("tiny-tgt", "test")] * 2  # once a run, not once a checkpoint
    monkeypatch.undo()
    written = {p.name: p.stat().st_mtime_ns for p in (a / "eval").iterdir()}
    assert table([str(a), "--domain", "tiny-tgt:test", "--steps", "4"]) == [only[0]]
    again = {p.name for p in (a / "eval").iterdir() if p.stat().st_mtime_ns != written.get(p.name)}
    assert len(again) == 1 and "step00000004" in again.pop()  # --steps 4: step 2 was not evaluated again
    other = table([str(a), str(b), "--domain", "tiny-src"])
    assert [r[3:6] for r in other] == [["tiny-src:test", "2", "0,1"], ["tiny-src:test", "4", "0,1"]]
    assert [r[6] for r in other] != [r[6] for r in rows]

    for argv, msg in (([str(tmp_path / "nowhere")], "not a run folder"),
                      ([str(a), "--steps", "x"], "--steps takes comma-separated integers"),
                      ([str(a), "--domain", "nosuch"], "--domain: unknown domain 'nosuch'"),
                      ([str(a), "--domain", "office31-amazon"], "office31-amazon has classes")):
        refused(curves.main, argv, msg, capsys)
    for p in (a / "checkpoints").glob("step-*"):
        p.unlink()
    refused(curves.main, [str(a), "--domain", "tiny-tgt"], "no checkpoint was kept; train with --save-every N "
                                                            "--keep-checkpoints 0", capsys)
    (a / "metrics.jsonl").write_text("")
    refused(curves.main, [str(a)], "no evaluation was logged", capsys)


def test_translation_probe_tells_a_kept_digit_from_a_collapsed_translator(tmp_path, capsys, monkeypatch):
    """An I2I run's translator replaced by the identity (each MNIST digit stays itself) and by a
    constant (every digit becomes the first one): the probe's columns must tell them apart."""
    probe = load_tool("translation_probe")
    run, other = one_step_runs(tmp_path, "i2i", "source-only")

    def patch(method, kind):
        if kind == "identity":
            method.translate = lambda x, noise=None: x
        else:
            method.translate = lambda x, noise=None: x[:1].expand_as(x)

    mode = patch_loaded_methods(monkeypatch, patch)
    argv = [str(run), "--oracle-steps", "150", "--limit", "500", "--cache", str(tmp_path / "oracles")]
    cells = {}
    for kind in ("identity", "constant"):
        mode["kind"] = kind
        assert probe.main(argv) == 0
        cells[kind] = table_row(run, capsys)
    assert len(list((tmp_path / "oracles").iterdir())) == 1  # the second call reused the first's oracle
    ident, const = cells["identity"], cells["constant"]
    assert ident[1] == "1" and ident[2] == "mnist2000→usps1800" and ident[3] == const[3]  # same oracle, same %
    assert float(ident[3]) > 70  # the oracle reads USPS test
    assert float(ident[4]) > 40 and int(ident[5]) >= 8 and float(ident[6]) < 60 and float(ident[7]) > 0.5
    assert int(const[5]) == 1 and const[6] == "100" and const[7] == "0.00" and float(const[4]) < 20
    # The run's own classifier: on x_s it does not depend on the translator; on an identity
    # translator's G(x_s) = x_s it reads what it reads on x_s.
    assert ident[8] == const[8] and ident[10] == ident[8] and 0 <= float(ident[9]) <= 100
    # An oracle trained afresh in another cache is the same network (its initialisation is seeded too).
    mode["kind"] = "identity"
    assert probe.main(argv[:-1] + [str(tmp_path / "oracles2")]) == 0
    assert table_row(run, capsys) == ident

    monkeypatch.undo()
    for bad, msg in ((other, "is a source-only checkpoint, which does not translate images; translation_probe needs one of: "), (tmp_path / "nowhere", "no checkpoint at")):
        refused(probe.main, [str(bad), "--cache", str(tmp_path / "oracles")], msg, capsys)


def test_i2i_decoder_probe_tells_a_decoder_that_uses_z_from_one_that_ignores_it(tmp_path, capsys, monkeypatch):
    """An I2I run whose encoders pass the image through as z and decoders undo that (a perfect
    autoencoder), and one whose decoders draw a constant image: ``rec`` must read ~0 and >1."""
    import torch

    probe = load_tool("i2i_decoder_probe")
    run, other = one_step_runs(tmp_path, "i2i", "source-only")

    def patch(method, kind):
        method.f_x = method.f_y = lambda x: x.flatten(1)
        if kind == "perfect":
            method.g_x = method.g_y = lambda z: z.view(-1, 1, 32, 32)
        else:
            method.g_x = method.g_y = lambda z: torch.zeros(len(z), 1, 32, 32)

    mode = patch_loaded_methods(monkeypatch, patch)
    cells = {}
    for kind in ("perfect", "constant"):
        mode["kind"] = kind
        assert probe.main([str(run), "--fresh-steps", "30", "--limit", "200"]) == 0
        cells[kind] = [float(c) for c in table_row(run, capsys)[2:]]
    perfect, const = cells["perfect"], cells["constant"]
    assert perfect[0] == perfect[2] == 0.0 and const[0] > 1 and const[2] > 1
    assert perfect[1] == const[1] < 1 and perfect[3] == const[3] < 1  # the fresh decoder reads z = the image

    monkeypatch.undo()
    refused(probe.main, [str(other)], "is a source-only run; this probe reads i2i runs", capsys)


def test_optim_step_prints_both_networks_and_the_fused_kernels_take_the_same_step(capsys):
    rc = load_tool("optim_step").main(["--steps", "1", "--batch-size", "4"])
    rows = [l.split(" | ") for l in capsys.readouterr().out.splitlines() if l.startswith(("| lenet", "| svhn"))]
    assert rc == 0 and [(r[0], r[2]) for r in rows] == [("| lenet", "adam"), ("| lenet", "sgd"),
                                                        ("| svhn", "adam"), ("| svhn", "sgd")]
    assert [r[1] for r in rows] == ["0.66M", "0.66M", "25.90M", "25.90M"]
    # One step from the same weights: float rounding apart, the same update (lr 0.01 for SGD,
    # 2e-4 for Adam, whose step is lr * g / (|g| + eps) and can flip where |g| is near eps).
    diffs = {r[2]: max(float(x[-1].rstrip(" |")) for x in rows if x[2] == r[2]) for r in rows}
    assert diffs["sgd"] < 1e-6 and diffs["adam"] <= 4e-4


def test_a_row_says_which_optimizer_kernels_its_run_used(tmp_path, monkeypatch):
    import uda_cli.engine.setup as trainer  # where make_optimizer asks fused_ok

    bench = load_bench()
    args = dict(method="source-only", pair=bench.PAIRS["mnist-usps"], steps=2, seed=0, device="cpu",
                data_root=tmp_path / "data", batch_size=8)
    assert bench.run_one(out=tmp_path / "fused", **args)["optimizer_kernels"] == "fused"
    monkeypatch.setattr(trainer, "fused_ok", lambda params: False)  # as a torch without the kernel
    assert bench.run_one(out=tmp_path / "default", **args)["optimizer_kernels"] == "default"
    # PixelDA's optimizers (T and G, D), the first told the kernel is there and the others not.
    asked = []

    def first_only(params):
        asked.append(len(params))
        return len(asked) == 1

    monkeypatch.setattr(trainer, "fused_ok", first_only)
    assert bench.run_one(out=tmp_path / "mixed", **{**args, "method": "pixelda"})["optimizer_kernels"] == "mixed"
    assert len(asked) >= 2


def test_queue_runs_jobs_in_parallel_skips_finished_ones_and_keeps_a_cut_off_run(tmp_path):
    """tools/queue.sh: every job's rows land in OUT/NAME.json; a job with rows already is
    skipped (a cut-off queue resumes with the same command); the run folder an unfinished job
    left is moved aside, not overwritten, and the job runs again."""
    import json
    import os
    import subprocess

    out = tmp_path / "q"
    out.mkdir()
    (out / "done.json").write_text(json.dumps([{"method": "source-only", "seed": 9}]))
    (out / "cut.d").mkdir()
    (out / "cut.d" / "marker").write_text("an earlier, unfinished run")
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# comment\n\n"
                    "a --methods source-only --pairs mnist-usps --seeds 0\n"
                    "cut --methods source-only --pairs mnist-usps --seeds 1\n"
                    "done --methods source-only --pairs mnist-usps --seeds 9\n")
    import _launch

    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": _launch.pythonpath()}
    r = subprocess.run(["bash", str(REPO / "tools" / "queue.sh"), str(jobs), "2", str(out),
                        "--budget", "smoke", "--device", "cpu", "--batch-size", "8",
                        "--data-root", str(tmp_path / "data")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {n: json.loads((out / f"{n}.json").read_text()) for n in ("a", "cut", "done")}
    assert [(x["method"], x["seed"], x["budget"]) for x in rows["a"]] == [("source-only", 0, "smoke")]
    assert [x["seed"] for x in rows["cut"]] == [1] and rows["done"] == [{"method": "source-only", "seed": 9}]
    log = (out / "queue.log").read_text()
    assert "skip done" in log and "start done" not in log
    assert "end a rc 0" in log and "end cut rc 0" in log
    kept = list(out.glob("cut.d.cut-*"))
    assert len(kept) == 1 and (kept[0] / "marker").read_text() == "an earlier, unfinished run"


def test_queue_refuses_a_missing_jobs_file_and_a_bad_count(tmp_path):
    import subprocess

    q = str(REPO / "tools" / "queue.sh")
    for args, msg in (([str(tmp_path / "nope.txt"), "2", str(tmp_path)], "no jobs file"),
                      ([q, "0", str(tmp_path)], "a whole number >= 1")):
        r = subprocess.run(["bash", q, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_precision_reaches_the_run_its_folder_its_row_and_the_table(tmp_path, capsys):
    import json

    bench = load_bench()
    common = ["--methods", "source-only", "--pairs", "mnist-usps", "--budget", "smoke", "--device", "cpu",
              "--batch-size", "8", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    assert bench.main([*common, "--json", str(tmp_path / "auto.json")]) == 0
    assert bench.main([*common, "--precision", "bf16", "--json", str(tmp_path / "bf16.json")]) == 0  # not "already holds"
    cfg = json.loads((tmp_path / "runs" / "source-only_mnist-usps_smoke_b8_bf16_s0" / "config.json").read_text())
    assert cfg["options"]["precision"] == "bf16"
    auto, bf16 = (json.loads((tmp_path / f"{n}.json").read_text())[0] for n in ("auto", "bf16"))
    assert "precision" not in auto and bf16["precision"] == "bf16"
    capsys.readouterr()
    assert bench.main(["--from-json", str(tmp_path / "auto.json"), str(tmp_path / "bf16.json")]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if "MNIST→USPS" in l]
    assert len(lines) == 2 and sum("| precision=bf16 |" in l for l in lines) == 1


def test_eval_every_keeps_the_curve_in_the_row_without_changing_the_run(tmp_path, capsys):
    """--eval-every N: the row holds the trainer's evaluations on the target's test split (the
    rows come back from a GPU lease when run folders cannot), and evaluating during the run
    leaves its training alone: the final accuracy is the run's without them. A negative N is
    refused in one line."""
    import json

    import torch

    bench = load_bench()
    common = ["--methods", "pixelda", "--pairs", "mnist-usps", "--budget", "smoke", "--device", "cpu", "--steps", "6",
              "--batch-size", "8", "--data-root", str(tmp_path / "data"), "--set", "g_filters=8", "--set", "g_blocks=1"]
    assert bench.main([*common, "--json", str(tmp_path / "plain.json"), "--out", str(tmp_path / "plain")]) == 0
    assert bench.main([*common, "--eval-every", "2", "--json", str(tmp_path / "curve.json"),
                       "--out", str(tmp_path / "runs")]) == 0
    plain, curved = (json.loads((tmp_path / f"{n}.json").read_text())[0] for n in ("plain", "curve"))
    assert "curve" not in plain and curved["eval_every"] == 2 and curved["curve_domain"] == "usps1800:test"
    folder = "pixelda_mnist-usps_smoke_steps6_b8_g_blocks_1_g_filters_8_s0"
    logged = [json.loads(l) for l in (tmp_path / "runs" / folder / "metrics.jsonl").read_text().splitlines()]
    assert curved["curve"] == [[r["step"], r["accuracy"]] for r in logged if r["kind"] == "eval"]
    assert [s for s, _ in curved["curve"]] == [2, 4, 6] and all(0 <= a <= 1 for _, a in curved["curve"])
    assert curved["curve"][-1][1] == curved["accuracy"]  # the last point is the row's own number (same split)
    # The same weights bit for bit (six steps of PixelDA still read every USPS image alike, so
    # equal accuracies alone would not show it).
    from safetensors.torch import load_file

    from uda_cli.engine.checkpoint import resolve_checkpoint

    a, b = (load_file(resolve_checkpoint(tmp_path / d / folder)) for d in ("plain", "runs"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert curved["accuracy"] == plain["accuracy"]
    refused(bench.main, [*common, "--eval-every", "-1"], "--eval-every -1: give a number of steps", capsys)


def test_pixeldas_mnist_usps_budgets_raise_gs_task_weight_and_no_other_pair_does(tmp_path):
    """The one pair-specific departure of the cpu and paper budgets reaches the run and its row,
    and no other pair gets it (nor the content loss, the earlier choice)."""
    import json

    bench = load_bench()
    assert dict(bench.budget_for("pixelda", "paper", "mnist-usps").params) == {"g_task_weight": 0.1}
    assert dict(bench.budget_for("pixelda", "cpu", "mnist-usps").params) == {"g_filters": 32, "g_task_weight": 0.1}
    assert bench.budget_for("pixelda", "paper", "mnist-mnistm").params == ()
    assert dict(bench.budget_for("pixelda", "cpu", "mnist-mnistm").params) == {"g_filters": 32}
    assert bench.main(["--methods", "pixelda", "--pairs", "mnist-usps", "--budget", "paper", "--device", "cpu",
                       "--steps", "2", "--batch-size", "4", "--data-root", str(tmp_path / "data"),
                       "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "rows.json")]) == 0
    row = json.loads((tmp_path / "rows.json").read_text())[0]
    assert row["params"] == {"g_task_weight": 0.1} and "g_task_weight=0.1" in bench._params_text(row)
    run = tmp_path / "runs" / "pixelda_mnist-usps_paper_steps2_b4_s0"
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert (cfg["g_task_weight"], cfg["gamma"]) == (0.1, 0.0)
    assert not any("g/content" in json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines())


def test_curves_keeps_bf16_runs_apart_from_float32_ones(tmp_path, capsys):
    """A run whose forward ran in bf16 (--precision bf16, or auto on a CUDA device: read from
    its config) is its own group, so two precisions of a setting are never averaged together."""
    import json
    import shutil

    from uda_cli.config import TrainOptions
    from uda_cli.engine.trainer import train

    curves = load_tool("curves")

    def run(name, seed, **kw):
        train(TrainOptions(method="source-only", src="tiny-src", tgt="tiny-tgt", steps=2, batch_size=8, out=tmp_path / name,
                           seed=seed, device="cpu", save_every=2, eval_every=2, log_every=2, **kw), interactive=False)
        return tmp_path / name

    runs = [run("fp32", 0), run("bf16", 1, precision="bf16")]
    shutil.copytree(runs[0], tmp_path / "gpu")  # the float32 run, as if it had run with auto on CUDA
    cfg = json.loads((tmp_path / "gpu" / "config.json").read_text())
    cfg["device"], cfg["options"]["seed"] = "cuda:0", 2
    (tmp_path / "gpu" / "config.json").write_text(json.dumps(cfg))
    assert curves.main([str(r) for r in (*runs, tmp_path / "gpu")]) == 0
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in capsys.readouterr().out.splitlines()[2:]]
    assert sorted((r[2], r[5]) for r in rows) == [("precision=bf16", "1,2"), ("–", "0")]


def test_study_pairs_run_only_when_named_and_every_pairs_domains_resolve(tmp_path, monkeypatch):
    """The default pair list is the papers' pairs (PAPER quotes a number for each, and for no
    other); the study pairs (MNIST-M as a source, whole and cut to SVHN's 1,083) are run only
    when --pairs names them. Every pair's source, target and test domain resolves, so a sliced
    source such as mnistm:train[:1083] is read as a part of a split; and prepare_data_root links
    what a pair needs by the domain's name, whatever split part follows it."""
    from uda_cli.data.registry import get_domain, parse_domain, resolve_split

    bench = load_bench()
    assert bench.PAPER_PAIRS == ("mnist-usps", "usps-mnist", "svhn-mnist", "mnist-mnistm")
    assert {"mnistm-mnist", "mnistm1083-mnist"} <= set(bench.PAIRS) - set(bench.PAPER_PAIRS)
    assert bench.PAIRS["mnistm1083-mnist"].src == "mnistm:train[:1083]"
    for pair in bench.PAIRS.values():
        for text, default in ((pair.src, "train"), (pair.tgt, "train"), (pair.eval, "test")):
            name, split = parse_domain(text)
            assert resolve_split(get_domain(name), split, default)
    shared = tmp_path / "shared"
    for name in ("mnist", "usps"):
        (shared / name).mkdir(parents=True)
    bench.prepare_data_root(shared, tmp_path / "root", ["usps-mnist", "mnist-usps"])
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["mnist"]  # usps1800/mnist2000 ship embedded
    import uda_cli.data.download as download

    fetched = []
    monkeypatch.setattr(download, "download", lambda name, root, mirrors: fetched.append(name))
    bench.prepare_data_root(shared, tmp_path / "root", ["mnistm1083-mnist"])  # MNIST-M installed for its slice
    assert fetched == ["mnistm"]
