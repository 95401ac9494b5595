"""source-only, dann and i2i on Office-31 pairs (the ImageNet ResNet-50 networks), on tiny
files in the real layout: ``office31/<domain>/images/<class>/*.jpg``, all 31 class folders
(the reader wants them all), a few small JPEGs in three of them. 224x224 on one CPU thread,
batch 2, 2 steps, ``--set pretrained=none``: no weights are fetched, none are here."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from uda_cli.data.office import OFFICE31_CLASSES
from uda_cli.engine import checkpoint as ckpt

PER_CLASS = {"back_pack": 2, "mug": 2, "trash_can": 1}  # images in these; the other 28 folders are empty
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "i2i" / "office31.toml"


from test_i2i import _one_thread  # noqa: F401  (autouse: one torch thread per test)


def jpeg(seed: int, size: int = 24) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def office_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for d, domain in enumerate(("amazon", "webcam")):
        for c, name in enumerate(OFFICE31_CLASSES):
            folder = root / "office31" / domain / "images" / name
            folder.mkdir(parents=True)
            for i in range(PER_CLASS.get(name, 0)):
                (folder / f"frame_{i:04d}.jpg").write_bytes(jpeg(100 * d + 10 * c + i))
    return root


def run(argv, capsys):
    from uda_cli.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def train_args(method: str, root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--method", method, "--src", "office31-amazon", "--tgt", "office31-webcam",
            "--set", "pretrained=none", "--steps", "2", "--batch-size", "2", "--data-root", str(root),
            "--out", str(out), "--device", "cpu", *extra]


def train_and_evaluate(method: str, root: Path, tmp_path: Path, capsys) -> dict:
    """Train 2 steps, then evaluate the run folder (the checkpoint round-trips): the config."""
    out = tmp_path / method
    code, _, err = run(train_args(method, root, out), capsys)
    assert code == 0, err
    meta = ckpt.read_metadata(ckpt.resolve_checkpoint(out))
    assert meta["step"] == 2 and meta["spec"]["image_size"] == [224, 224] and meta["spec"]["channels"] == 3
    report = tmp_path / f"{method}.json"
    code, stdout, err = run(["evaluate", str(out), "--json", str(report), "--data-root", str(root)], capsys)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["domain"].startswith("office31-webcam") and r["num_samples"] == 5 and r["step"] == 2
    assert len(r["confusion_matrix"]) == 31 and 0.0 <= r["accuracy"] <= 1.0
    return meta["config"]


def test_source_only_on_office(office_root, tmp_path, capsys):
    cfg = train_and_evaluate("source-only", office_root, tmp_path, capsys)
    # the Office recipe (CDAN's), with the run's own steps and batch
    assert (cfg["optimizer"], cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["lr_schedule"]) == \
        ("sgd", 1e-3, 0.9, 5e-4, "inv")
    assert (cfg["steps"], cfg["batch_size"], cfg["pretrained"]) == (2, 2, "none")


def test_dann_on_office(office_root, tmp_path, capsys):
    cfg = train_and_evaluate("dann", office_root, tmp_path, capsys)
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["lr_schedule"]) == ("sgd", 1e-3, 5e-4, "inv")
    rows = [json.loads(line) for line in (tmp_path / "dann" / "metrics.jsonl").read_text().splitlines()]
    assert any("d/adv" in r and "c/cls" in r for r in rows)


def test_i2i_on_office(office_root, tmp_path, capsys):
    cfg = train_and_evaluate("i2i", office_root, tmp_path, capsys)
    example = tomllib.loads(EXAMPLE.read_text())["params"]
    for k in ("lambda_c", "lambda_z", "lambda_id", "lambda_tr", "lambda_cyc", "lambda_trc", "lr", "grayscale"):
        assert cfg[k] == example[k], k  # the Office defaults are examples/i2i/office31.toml's
    rows = [json.loads(line) for line in (tmp_path / "i2i" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "g/total" in r][-1]
    # terms with a weight are computed, lambda_cyc = 0 is not
    assert {"c/cls", "g/z", "g/id", "g/tr", "c/trc", "d/z", "d/tr"} <= set(last) and "g/cyc" not in last


def test_missing_imagenet_weights_is_one_line(office_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    args = train_args("dann", office_root, tmp_path / "run")
    args[args.index("pretrained=none")] = "pretrained=imagenet"
    code, _, err = run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    path = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert f"not found at {path}" in lines[0] and "$TORCH_HOME" in lines[0] and "pretrained=none" in lines[0]
    assert not (tmp_path / "torch").exists()  # nothing fetched


def test_networks_recipes_and_refusals(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import resnet50

    from uda_cli.errors import ConfigError
    from uda_cli.methods.base import RunSpec
    from uda_cli.methods.cbst import CBST
    from uda_cli.methods.dann import DANN
    from uda_cli.methods.i2i import I2I
    from uda_cli.methods.source_only import SourceOnly, build_digit_nets
    from uda_cli.models.classifiers import ResNet50Encoder

    office = ("office31-amazon", "office31-dslr")
    # digits keep their defaults: nothing from the Office recipes reaches them
    for cls in (SourceOnly, DANN, I2I):
        assert cls.task_defaults("classification", ("mnist", "usps")) == {}
    assert SourceOnly.task_defaults("classification", office)["batch_size"] == 32
    assert DANN.task_defaults("classification", office)["steps"] == 10_000

    # pretrained=FILE: torchvision's names (fc dropped) or one prefix
    ref = resnet50(weights=None)
    f = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    enc = ResNet50Encoder(pretrained=str(f))
    assert torch.equal(enc.net.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)
    save_file({f"F.net.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(f))  # a run's F
    assert torch.equal(ResNet50Encoder(pretrained=str(f)).net.conv1.weight, ref.conv1.weight)
    with pytest.raises(ConfigError, match="pickled file"):
        ResNet50Encoder(pretrained=str(tmp_path / "r50.pth"))

    spec = RunSpec(task="classification", classes=OFFICE31_CLASSES, channels=3, image_size=(224, 224), domains=office)
    with pytest.raises(ConfigError, match="not Office-31's 224x224 photos"):  # cbst keeps digit networks
        build_digit_nets(CBST.Config(), spec)
    with pytest.raises(ConfigError, match="d_input=conv"):
        DANN(DANN.Config(pretrained="none", d_input="conv"), spec)
    grey = RunSpec(task="classification", classes=OFFICE31_CLASSES, channels=1, image_size=(224, 224), domains=office)
    with pytest.raises(ConfigError, match="runs in colour"):
        I2I(I2I.Config(pretrained="none"), grey)


def test_evaluation_batches_shrink_with_the_image_size():
    """The trainer's end-of-run evaluation: 512 digits per batch, as many pixels at 224x224."""
    from uda_cli.engine.setup import classification_eval_batch

    assert classification_eval_batch((32, 32)) == 512 and classification_eval_batch((28, 28)) == 512
    assert classification_eval_batch((224, 224)) == 10 and classification_eval_batch((2000, 2000)) == 2
