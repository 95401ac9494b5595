"""The command line as a user meets it: help, validation, errors, train -> evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from uda_cli.cli.app import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_help_is_fast_and_does_not_import_torch():
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "import sys; from uda_cli.cli.app import main; "
                        "sys.argv=['uda','--help']\ntry: main()\nexcept SystemExit: pass\n"
                        "assert 'torch' not in sys.modules, 'torch imported by --help'"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t < 3.0  # generous for CI; ~0.2 s here
    for cmd in ("download", "train", "adapt-images", "evaluate", "tsne"):
        assert cmd in r.stdout


def test_every_problem_gets_one_line_and_exit_2(capsys):
    code, out, err = run(["train", "--method", "source-only", "--src", "mnist2000", "--tgt", "usps18",
                          "--steps", "0", "--device", "gpu", "--set", "foo=1", "--set", "lr=-1"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert any(l.startswith("error: --tgt: unknown domain 'usps18'") for l in lines)
    assert any(l.startswith("error: --steps:") for l in lines)
    assert any(l.startswith("error: --device:") for l in lines)
    assert any(l.startswith("error: --set foo: unknown hyperparameter") for l in lines)
    assert any(l.startswith("error: --set lr:") for l in lines)
    assert "Traceback" not in err


def test_method_typo_lists_known_methods(capsys):
    code, _, err = run(["train", "--method", "sorce-only", "--src", "mnist2000", "--tgt", "usps1800"], capsys)
    assert code == 2 and "did you mean 'source-only'" in err and "known methods:" in err


def test_missing_required_option(capsys):
    code, _, err = run(["train", "--src", "mnist2000", "--tgt", "usps1800"], capsys)
    assert code == 2 and "--method: Field required" in err


def test_bad_integer_is_one_line(capsys):
    code, _, err = run(["train", "--steps", "abc"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--steps" in err


def test_missing_argument_is_one_line(capsys):
    for cmd in ("adapt-images", "tsne", "evaluate"):
        code, _, err = run([cmd], capsys)
        assert code == 2 and "Missing argument" in err and len(err.strip().splitlines()) == 1


def test_config_file_and_flags_override(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "source-only"\nsrc = "tiny-src"\ntgt = "tiny-tgt"\nsteps = 3\nbatch-size = 4\n'
                   f'out = "{tmp_path / "from-file"}"\ndevice = "cpu"\n[params]\nlr = 0.001\n')
    code, out, err = run(["train", "--config", str(cfg), "--steps", "2", "--set", "lr=0.002",
                          "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["options"]["steps"] == 2 and saved["options"]["batch_size"] == 4
    assert saved["config"]["lr"] == 0.002
    assert not (tmp_path / "from-file").exists()
    assert "target accuracy (tiny-tgt:test)" in out


def test_config_file_unknown_field(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('method = "source-only"\nsrc = "tiny-src"\ntgt = "tiny-tgt"\nstepz = 3\n')
    code, _, err = run(["train", "--config", str(cfg)], capsys)
    assert code == 2 and f"{cfg}: field 'stepz' is unknown (did you mean 'steps'?)" in err
    code, _, err = run(["train", "--config", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "no file at" in err
    (tmp_path / "broken.toml").write_text("method = \n")
    code, _, err = run(["train", "--config", str(tmp_path / "broken.toml")], capsys)
    assert code == 2 and "not valid TOML" in err


def test_train_then_evaluate(tmp_path, capsys):
    runs = tmp_path / "run"
    code, out, err = run(["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tgt",
                          "--steps", "4", "--batch-size", "8", "--out", str(runs), "--device", "cpu"], capsys)
    assert code == 0, err
    report = tmp_path / "r.json"
    code, out, err = run(["evaluate", str(runs), "--domain", "tiny-src:test", "--json", str(report)], capsys)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["domain"] == "tiny-src:test" and r["num_samples"] == 64 and r["step"] == 4
    assert len(r["confusion_matrix"]) == 10 and sum(map(sum, r["confusion_matrix"])) == 64
    assert set(r["per_class_accuracy"]) == set("0123456789")
    assert "confusion matrix" in out
    # a checkpoint file works as well as a run folder, and the default domain is the run's target
    ck = next((runs / "checkpoints").glob("step-*[0-9].safetensors"))
    code, out, err = run(["evaluate", str(ck)], capsys)
    assert code == 0 and "tiny-tgt:test" in out


def test_evaluate_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(["evaluate", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["evaluate", str(tmp_path / "empty")], capsys)
    assert code == 1 and "no checkpoint" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 10)
    code, _, err = run(["evaluate", str(bad)], capsys)
    assert code == 1 and "truncated" in err


def test_missing_dataset_says_how_to_get_it(tmp_path, capsys):
    code, _, err = run(["train", "--method", "source-only", "--src", "mnist", "--tgt", "usps1800",
                        "--data-root", str(tmp_path), "--out", str(tmp_path / "r"), "--device", "cpu"], capsys)
    assert code == 1 and "uda download mnist" in err and str(tmp_path) in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    env = {**os.environ, "UDA_DEBUG": "1"}
    r = subprocess.run([sys.executable, "-m", "uda_cli", "evaluate", str(tmp_path / "none")], capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "uda_cli", "evaluate", str(tmp_path / "none")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_existing_run_needs_resume(tmp_path, capsys):
    args = ["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tgt", "--steps", "2",
            "--batch-size", "4", "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)
    assert code == 2 and "--resume auto" in err
    code, out, err = run(args + ["--resume", "auto", "--steps", "4"], capsys)
    assert code == 0, err


def test_an_output_that_cannot_be_written_is_one_line_before_the_work(tmp_path, capsys):
    """A file where a folder must go (or the other way round) is named in one line, exit != 0,
    before any training, embedding or evaluation runs."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    train = ["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tgt", "--steps", "2",
             "--batch-size", "4", "--device", "cpu", "--out"]
    for out, why in ((afile, "a file of that name is in the way"), (afile / "sub", "Not a directory")):
        code, _, err = run(train + [str(out)], capsys)
        assert code == 1 and err.strip().splitlines() == [
            f"error: could not create the run folder {out}: {why}; pass --out a folder you can write to"]
    assert afile.read_text() == "x"
    assert run(train + [str(tmp_path / "r")], capsys)[0] == 0
    code, _, err = run(["evaluate", str(tmp_path / "r"), "--json", str(tmp_path)], capsys)
    assert code == 2 and "is a folder; pass a file path" in err and len(err.strip().splitlines()) == 1
    code, out, err = run(["evaluate", str(tmp_path / "r"), "--json", str(afile / "r.json")], capsys)
    assert code == 1 and "could not create the --json folder" in err and len(err.strip().splitlines()) == 1
    assert "accuracy" not in out  # failed before evaluating
    code, _, err = run(["tsne", str(tmp_path / "r"), "--out", str(afile / "map")], capsys)
    assert code == 1 and "could not create the map's folder" in err and "t-SNE" not in err


def test_a_write_that_fails_mid_run_keeps_the_last_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    """A full disk at the second checkpoint: one line naming the file, the step and the checkpoint
    to resume from; that checkpoint is whole, no temporary file is left, --resume auto finishes."""
    import errno

    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst).startswith("step-00000010"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    run_dir = tmp_path / "r"
    args = ["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tgt", "--steps", "12",
            "--batch-size", "4", "--device", "cpu", "--save-every", "5", "--out", str(run_dir)]
    code, _, err = run(args, capsys)
    header, *lines = err.strip().splitlines()  # the run's header line comes first
    assert header.startswith("source-only: tiny-src:train -> tiny-tgt:train | networks F ")
    assert code == 1 and len(lines) == 1, err
    state = run_dir / "checkpoints" / "step-00000010.state.safetensors"
    assert lines[0] == (f"error: could not write {state}: No space left on device; check that the folder is "
                        "writable and has space (at step 10; the last complete checkpoint is step-00000005; "
                        "continue with --resume auto once that is fixed)")
    ckdir = run_dir / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "step-00000005"
    assert not [p for p in ckdir.iterdir() if ".tmp-" in p.name or p.name.startswith("step-00000010")]
    monkeypatch.setattr(os, "replace", real_replace)
    code, _, err = run(args + ["--resume", "auto"], capsys)
    assert code == 0, err
    assert (ckdir / "latest").read_text().strip() == "step-00000012"


@pytest.mark.parametrize("method", ["source-only", "dann", "i2i", "pixelda", "dtn"])
def test_every_method_keeps_the_shared_hyperparameter_ranges(method):
    """A method that re-declares lr, betas, batch_size or weight_decay for its paper's default
    still refuses what the optimizer would crash on, in one --set line each."""
    from uda_cli.config import method_config
    from uda_cli.errors import ConfigError

    method_config(method, {})  # the paper's defaults are in range
    for name, value, msg in (("lr", -1e-3, "greater than 0"), ("betas", [0.5, 1.0], "less than 1"),
                             ("batch_size", 0, "greater than 0"), ("weight_decay", -1, "greater than or equal to 0"),
                             ("grad_clip", 0, "greater than 0")):
        with pytest.raises(ConfigError) as e:
            method_config(method, {name: value})
        line = str(e.value).splitlines()[0]  # "--set betas.1: ..." where the base's own field answers
        assert line.startswith(f"--set {name}") and line.endswith(f": Input should be {msg}"), line


def test_resuming_a_checkpoint_past_steps_says_so(tmp_path, capsys):
    args = ["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tgt", "--batch-size", "4",
            "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert run(args + ["--steps", "4"], capsys)[0] == 0
    code, out, err = run(args + ["--steps", "2", "--resume", "auto"], capsys)
    assert code == 2 and "is at step 4, past --steps 2; pass --steps 4 or more" in err and not out
