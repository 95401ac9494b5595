"""`uda adapt-images`: export, manifest, preview, resume, errors, and training on the export."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from uda_cli.cli.app import main
from uda_cli.config import AdaptImagesOptions
from uda_cli.data.registry import DIGIT_CLASSES, DomainSpec, _DOMAINS, register_domain
from uda_cli.engine import adapt
from uda_cli.engine.adapt import adapt_images, image_seed, noise_fn
from uda_cli.engine.trainer import load_method
from uda_cli.engine import checkpoint as ckpt

# Small networks keep the CPU runs fast; the architecture is pixelda's.
SMALL = ["--set", "g_filters=8", "--set", "g_blocks=1", "--set", "d_filters=8", "--set", "task_net=lenet"]
N_SRC = 64  # images in tiny-src:train (tests/conftest.py); label of image i is i % 10


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def train_cli(out, method="pixelda", tgt="tiny-rgb", extra=(), src="tiny-src"):
    argv = ["train", "--method", method, "--src", src, "--tgt", tgt, "--steps", "2", "--batch-size", "4",
            "--device", "cpu", "--eval-every", "0", "--out", str(out), *extra]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """pixelda tiny-src -> tiny-rgb (colour), pixelda tiny-src -> tiny-tgt (grey), and source-only."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    train_cli(root / "rgb", extra=SMALL)
    train_cli(root / "grey", tgt="tiny-tgt", extra=SMALL)
    train_cli(root / "plain", method="source-only")
    return root


def files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png")) if p.name != "preview.png"}


# ---- the export, read back by a training run ----------------------------------------------------

def test_export_manifest_preview_and_train_on_it(runs, tmp_path, capsys):
    out = tmp_path / "exp"
    code, stdout, err = run(["adapt-images", str(runs / "rgb"), "--out", str(out), "--device", "cpu",
                             "--batch-size", "24"], capsys)
    assert code == 0, err
    assert f"wrote {N_SRC} images, 0 already there" in stdout
    weights = ckpt.resolve_checkpoint(runs / "rgb")
    m = json.loads((out / "manifest.json").read_text())
    assert m["checkpoint"] == str(weights.resolve())
    assert m["checkpoint_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert m["method"] == "pixelda" and m["config"]["g_blocks"] == 1 and m["step"] == 2
    assert (m["domain"], m["split"], m["seed"]) == ("tiny-src", "train", 0)  # the run's source by default
    assert m["image_size"] == [32, 32] and m["channels"] == 3 and m["classes"] == list(DIGIT_CLASSES)
    assert m["num_images"] == N_SRC and m["num_source_images"] == N_SRC and m["samples_per_image"] == 1
    assert m["complete"] is True and m["uda_version"] and m["layout"] == "<class>/<index>.png"
    # Every source image, in its class folder, as a colour PNG at the run's size.
    assert set(files(out)) == {f"{i % 10}/{i}.png" for i in range(N_SRC)}
    with Image.open(out / "7" / "17.png") as im:
        assert im.mode == "RGB" and im.size == (32, 32)
    # What was written is the translator's output for that image.
    method, _ = load_method(weights, torch.device("cpu"))
    from uda_cli.data.registry import load_domain
    from uda_cli.data.transforms import denormalize, normalize

    x, _ = load_domain("tiny-src", "train", channels=3)
    z = noise_fn(method, 0)([17], 0)
    with torch.no_grad():
        want = denormalize(method.translate(normalize(x[17:18]), z))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(out / "7" / "17.png")), want)
    # The preview: 16 sources above 16 translations, cells scaled to 64 px with 2 px gaps,
    # after a left margin that names the rows ("source", "translated").
    with Image.open(out / "preview.png") as im:
        im.load()
        margin = im.size[0] - (2 + 16 * 66)
        assert im.size[1] == 2 + 2 * 66 and 20 < margin < 200
        a = np.asarray(im)
        assert np.array_equal(a[2 + 66 : 2 + 66 + 64 : 2, margin + 2 : margin + 66 : 2], np.asarray(Image.open(out / "0" / "0.png")))
        for row in range(2):  # each row's name is drawn (dark pixels) beside it, not elsewhere
            band = a[2 + row * 66 : 2 + row * 66 + 64, :margin]
            assert (band < 128).any()
        assert not (a[:2, :margin] < 128).any()

    code, stdout, err = run(["train", "--method", "source-only", "--src", f"folder:{out}", "--tgt", "tiny-rgb",
                             "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "on-exp")],
                            capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "on-exp" / "config.json").read_text())
    assert cfg["src"] == f"folder:{out.resolve()}:all"


# ---- resume -------------------------------------------------------------------------------------

def test_interrupted_export_finishes_to_the_same_images(runs, tmp_path, capsys, monkeypatch):
    argv = lambda out: ["adapt-images", str(runs / "rgb"), "--out", str(out), "--device", "cpu",  # noqa: E731
                        "--samples-per-image", "2", "--limit", "20", "--batch-size", "8", "--seed", "3"]
    code, _, err = run(argv(tmp_path / "whole"), capsys)
    assert code == 0, err
    whole = files(tmp_path / "whole")
    assert set(whole) == {f"{i % 10}/{i}_{k}.png" for i in range(20) for k in range(2)}

    real, count = adapt._write_png, [0]

    def dies_after_13(path, data):
        if count[0] == 13:
            raise KeyboardInterrupt
        count[0] += 1
        real(path, data)

    part = tmp_path / "part"
    monkeypatch.setattr(adapt, "_write_png", dies_after_13)
    code, _, err = run(argv(part), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is progress
    assert code == 130 and len(errors) == 1 and "run the same command again" in errors[0]
    assert len(files(part)) == 13
    assert json.loads((part / "manifest.json").read_text())["complete"] is False
    monkeypatch.setattr(adapt, "_write_png", real)

    (part / "0" / ".0_0.png.tmp-999").write_bytes(b"half")  # left by a killed writer
    (part / "1" / "1_0.png").write_bytes(b"")  # emptied by a power cut: counts as missing
    before = {p: (part / p).stat().st_mtime_ns for p in files(part) if p != "1/1_0.png"}
    code, stdout, err = run(argv(part), capsys)
    assert code == 0, err
    assert "wrote 28 images, 12 already there" in stdout
    assert files(part) == whole  # the same bytes as the uninterrupted export
    assert not (part / "0" / ".0_0.png.tmp-999").exists()
    assert all((part / p).stat().st_mtime_ns == t for p, t in before.items())  # finished files untouched

    r = adapt_images(AdaptImagesOptions(target=runs / "rgb", out=part, samples_per_image=2, limit=20, seed=3,
                                        device="cpu"), interactive=False)
    assert (r.written, r.skipped, r.total) == (0, 40, 40)  # a finished export: nothing to do


def test_limit_can_grow_an_export(runs, tmp_path):
    o = dict(target=runs / "grey", out=tmp_path / "exp", device="cpu")
    assert adapt_images(AdaptImagesOptions(**o, limit=5), interactive=False).written == 5
    r = adapt_images(AdaptImagesOptions(**o, limit=12), interactive=False)
    assert (r.written, r.skipped) == (7, 5) and r.manifest["num_images"] == 12
    with Image.open(tmp_path / "exp" / "3" / "3.png") as im:
        assert im.mode == "L"  # a grey run exports grey images


def test_a_grey_run_exports_its_own_colour_source_in_grey(tmp_path, capsys):
    """i2i turns a colour source grey (grayscale=true, as the paper does for SVHN); exporting
    that source is what the run trained on, so it works and writes the luma images' translation."""
    torch.set_num_threads(1)
    train_cli(tmp_path / "run", method="i2i", src="tiny-rgb", tgt="tiny-tgt")
    out = tmp_path / "exp"
    code, stdout, err = run(["adapt-images", str(tmp_path / "run"), "--out", str(out), "--device", "cpu",
                             "--limit", "12"], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert (m["domain"], m["channels"], m["num_images"]) == ("tiny-rgb", 1, 12)
    from uda_cli.data.registry import load_domain
    from uda_cli.data.transforms import denormalize, normalize

    method, _ = load_method(ckpt.resolve_checkpoint(tmp_path / "run"), torch.device("cpu"))
    x, _ = load_domain("tiny-rgb", "train", channels=1)
    with torch.no_grad():
        want = denormalize(method.translate(normalize(x[7:8])))[0, 0].numpy()
    with Image.open(out / "7" / "7.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), want)


# ---- noise --------------------------------------------------------------------------------------

def test_noise_depends_only_on_seed_image_and_sample(runs):
    method, _ = load_method(ckpt.resolve_checkpoint(runs / "rgb"), torch.device("cpu"))
    draw = noise_fn(method, seed=5)
    state = torch.get_rng_state()
    a = draw([3, 4, 5], 0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert a.shape == (3, method.cfg.noise_dim) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(draw([4], 0)[0], a[1])  # whatever batch the image is in
    assert not torch.equal(draw([4], 1)[0], a[1])  # another sample k
    assert not torch.equal(noise_fn(method, seed=6)([4], 0)[0], a[1])  # another seed
    assert image_seed(0, 1, 0) != image_seed(0, 0, 1) and 0 <= image_seed(9, 9, 9) < 2**63
    plain, _ = load_method(ckpt.resolve_checkpoint(runs / "plain"), torch.device("cpu"))
    assert noise_fn(plain, 0) is None


# ---- errors -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd_domains():
    """A segmentation domain and a classification domain with other classes (never read)."""
    def reader(_folder, _split):
        raise AssertionError("must be refused before reading")

    for name, task, classes in (("tiny-seg", "segmentation", DIGIT_CLASSES), ("tiny-abc", "classification", ("a", "b"))):
        if name not in _DOMAINS:
            register_domain(DomainSpec(name=name, task=task, classes=classes, channels=1, image_size=(32, 32),
                                       splits=("train",), train_split="train", eval_split="train", dataset=None,
                                       reader=reader))


@pytest.mark.parametrize("case,args,message", [
    ("plain", [], "source-only checkpoint, which does not translate images; adapt-images needs one of: "),
    ("grey", ["--domain", "tiny-rgb"], "tiny-rgb:train is colour but"),  # not a domain of that run
    ("rgb", ["--domain", "tiny-seg"], "is a segmentation domain but"),
    ("rgb", ["--domain", "tiny-abc"], "has classes ['a', 'b']"),
    ("rgb", ["--domain", "tiny-src:valid"], "no split 'valid'"),
    ("rgb", ["--samples-per-image", "0"], "--samples-per-image:"),
])
def test_refusals_are_one_line(runs, odd_domains, tmp_path, capsys, case, args, message):
    code, _, err = run(["adapt-images", str(runs / case), "--out", str(tmp_path / "exp"), "--device", "cpu", *args],
                       capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "exp").exists()  # nothing written before the checks


def test_existing_folders_that_are_not_this_export(runs, tmp_path, capsys):
    out = tmp_path / "exp"
    base = ["adapt-images", "--out", str(out), "--device", "cpu", "--limit", "3"]
    assert run([*base, str(runs / "grey")], capsys)[0] == 0
    code, _, err = run([*base, str(runs / "rgb")], capsys)
    assert code == 2 and "holds an export of another checkpoint" in err
    code, _, err = run([*base, str(runs / "grey"), "--seed", "1"], capsys)
    assert code == 2 and "was exported with --seed 0, not 1" in err
    code, _, err = run([*base, str(runs / "grey"), "--domain", "tiny-src:test"], capsys)
    assert code == 2 and "is an export of tiny-src:train, not tiny-src:test" in err
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    code, _, err = run(["adapt-images", str(runs / "grey"), "--out", str(other), "--device", "cpu"], capsys)
    assert code == 2 and "is not a uda export" in err
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]


def test_an_out_under_a_file_is_one_line(runs, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run(["adapt-images", str(runs / "grey"), "--out", str(afile / "exp"), "--device", "cpu"], capsys)
    assert code == 1 and err.strip().splitlines() == [
        f"error: could not create the export folder {afile / 'exp'}: Not a directory; pass --out a folder you can write to"]
