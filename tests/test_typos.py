"""A mistyped name gets the closest known one, and says where it was typed: the flag, --set,
or the config file and its field."""

from __future__ import annotations

import pytest

from test_cli import run
from uda_cli.config import merge_train_options
from uda_cli.errors import ConfigError, did_you_mean
from uda_cli.methods.registry import get_method


def test_did_you_mean_picks_the_closest_name_or_none():
    assert did_you_mean("stpes", ["steps", "seed", "src"]) == " (did you mean 'steps'?)"
    assert did_you_mean("lrate", ["lr", "betas", "weight_decay"]) == " (did you mean 'lr'?)"
    # case and - / _ are ignored, the suggestion is spelled as the choice is
    assert did_you_mean("Batch-Size", ["batch_size", "steps"]) == " (did you mean 'batch_size'?)"
    assert did_you_mean("zzz", ["lr", "steps"]) == ""
    assert did_you_mean("x", []) == ""


def test_method_typo_uses_the_shared_helper():
    with pytest.raises(ConfigError, match=r"unknown method 'sorce-only' \(did you mean 'source-only'\?\); known methods: "):
        get_method("sorce-only")


def test_set_typo_names_the_flag_the_method_and_the_closest_hyperparameter(capsys):
    code, _, err = run(["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tgt",
                        "--set", "lrate=1e-3"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert "error: --set lrate: unknown hyperparameter of source-only (did you mean 'lr'?)" in lines
    assert any(line.startswith("error: source-only hyperparameters: ") for line in lines)
    assert "Traceback" not in err


def test_toml_typos_name_the_file_and_its_field(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "source-only"\nsrc = "tiny-src"\ntgt = "tiny-tgt"\nstpes = 3\nbatch-sise = 4\n'
                   'seed = -1\n[params]\nlrate = 0.1\nlr = -1\n')
    code, _, err = run(["train", "--config", str(cfg)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert f"error: {cfg}: field 'stpes' is unknown (did you mean 'steps'?)" in lines
    # the suggestion follows the file's spelling of keys (dashes)
    assert f"error: {cfg}: field 'batch-sise' is unknown (did you mean 'batch-size'?)" in lines
    assert any(line.startswith(f"error: {cfg}: field 'seed': ") for line in lines)
    assert f"error: {cfg}: [params] field 'lrate' is unknown to source-only (did you mean 'lr'?)" in lines
    assert any(line.startswith(f"error: {cfg}: [params] field 'lr': ") for line in lines)
    assert not any(line.startswith(("error: --stpes", "error: --set")) for line in lines)


def test_a_flag_or_set_over_a_file_value_is_named_as_the_flag(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "source-only"\nsrc = "tiny-src"\ntgt = "tiny-tgt"\nsteps = 3\n[params]\nlr = 0.1\n')
    with pytest.raises(ConfigError) as e:
        merge_train_options(cfg, {"steps": 0}, {"lr": -1.0})
    lines = str(e.value).splitlines()
    assert any(line.startswith("--steps: ") for line in lines)
    assert any(line.startswith("--set lr: ") for line in lines)
    assert not any(str(cfg) in line for line in lines)


def test_toml_method_typo_and_a_params_that_is_no_table(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('method = "sorce-only"\nsrc = "tiny-src"\ntgt = "tiny-tgt"\nparams = 3\n')
    with pytest.raises(ConfigError) as e:
        merge_train_options(cfg, {}, {})
    lines = str(e.value).splitlines()
    assert any(line.startswith(f"{cfg}: field 'method': unknown method 'sorce-only' (did you mean 'source-only'?)")
               for line in lines)
    assert any(line.startswith(f"{cfg}: field 'params' must be a table") for line in lines)


def test_a_config_check_of_several_fields_names_the_file_when_only_it_set_them(tmp_path):
    cfg = tmp_path / "run.toml"
    zeros = "".join(f"lambda_{n} = 0\n" for n in ("c", "z", "id", "tr", "cyc", "trc"))
    cfg.write_text(f'method = "i2i"\nsrc = "tiny-src"\ntgt = "tiny-tgt"\n[params]\n{zeros}')
    with pytest.raises(ConfigError, match=rf"^{cfg}: \[params\]: every loss weight is 0"):
        merge_train_options(cfg, {}, {})
