"""tools/bf16_emulation.py: float32 layers that round as bf16 autocast does."""

from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from test_benchmark import load_bench, load_tool


def _is_bf16(t: torch.Tensor) -> bool:
    return torch.equal(t, t.to(torch.bfloat16).float())


def test_layers_round_like_autocast_and_the_patch_is_undone():
    emu = load_tool("bf16_emulation")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    up = nn.ConvTranspose2d(3, 4, 3)
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    y32 = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yac = net(x).float()
    ops = (F.conv2d, F.conv_transpose2d, F.linear)
    with emu.emulate_bf16():
        assert F.conv2d is not ops[0]
        y = net(x)
        y.sum().backward()
        u = up(x)
    assert (F.conv2d, F.conv_transpose2d, F.linear) == ops
    assert y.dtype == torch.float32 and _is_bf16(y) and _is_bf16(u) and not _is_bf16(y32)
    # Conv and linear: what CPU autocast gives, to the bit (both sum bf16 products in fp32).
    # ConvTranspose2d is not compared: CPU autocast's bf16 kernel for it sums less exactly
    # (0.5% off float32, where the emulation's fp32 sums are 0.003% off).
    assert torch.equal(y, yac) and not torch.equal(y32, yac)
    for p in net.parameters():  # each weight's gradient went out through a bf16 rounding
        assert _is_bf16(p.grad)
    assert _is_bf16(x.grad)


def test_refuses_what_it_cannot_emulate(capsys, tmp_path):
    emu = load_tool("bf16_emulation")
    assert emu.main(["evaluate", str(tmp_path)]) == 2
    assert emu.main(["train", "--method", "dann", "--precision", "bf16", "--out", str(tmp_path / "r")]) == 2
    assert emu.main(["train", "--method", "dann"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("bf16_emulation.py: ") for line in err)


def test_a_run_trains_under_it_and_is_marked(tmp_path):
    emu = load_tool("bf16_emulation")
    out = tmp_path / "run"
    rc = emu.main(["train", "--method", "source-only", "--src", "mnist2000", "--tgt", "usps1800", "--steps", "2",
                   "--batch-size", "4", "--device", "cpu", "--eval-every", "0", "--out", str(out), "--log-format", "json"])
    assert rc == 0 and (out / "BF16_EMULATION").is_file()
    assert json.loads((out / "config.json").read_text())["options"]["precision"] == "fp32"
    assert F.conv2d.__name__ == "conv2d" and not hasattr(F.conv2d, "__wrapped__")


def test_digits_runs_under_it_and_its_row_says_fp32(tmp_path, monkeypatch):
    emu = load_tool("bf16_emulation")
    calls = []
    real = F.linear

    def counting(*a, **k):  # the rounding wrapper is what digits.py's run calls
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "linear", counting)
    rc = emu.main(["digits", "--methods", "source-only", "--pairs", "mnist-usps", "--budget", "smoke", "--device", "cpu",
                   "--batch-size", "8", "--data-root", str(tmp_path / "data"), "--json", str(tmp_path / "rows.json"),
                   "--out", str(tmp_path / "runs")])
    assert rc == 0 and calls and (tmp_path / "runs" / "BF16_EMULATION").is_file()
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 1 and rows[0]["precision"] == "fp32" and rows[0]["steps"] == 3
    assert rows[0]["emulation"] == "bf16"
    assert F.linear is counting
    # The table and the curves keep an emulated run apart from a float32 one.
    digits, curves = load_bench("digits"), load_tool("curves")
    assert "emulation=bf16" in digits._params_text(rows[0]) and "emulation" not in digits._params_text(
        {k: v for k, v in rows[0].items() if k != "emulation"})
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert "emulation=bf16" in curves.read_run(run)[0][2]
