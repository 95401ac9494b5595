"""The benchmark datasets' download flows against a server the test starts on 127.0.0.1.

Reuses test_download's server (Range support, cut-offs, 404s, an HTML switch, and routes for
a fake login site) and its guard that refuses every other host. The catalogue's real entries
are copied with their URLs pointed at that server; every file is made in the test (tiny
PNG/JPEG images in zips, tarballs and a stand-in RAR), so nothing here needs shared/data.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_download import local_only, make_tar, output, quiet, server  # noqa: F401  (fixtures)
from uda_cli.data import download as dl
from uda_cli.data.download import Credentials, Resource, archives
from uda_cli.errors import DataError, DownloadError, UDAError

PASSWORD = "s3cret-Pa55word!"


# --------------------------------------------------------------------------------------
# Helpers: tiny images and archives
# --------------------------------------------------------------------------------------


def png(seed: int = 0, size: int = 4) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int = 0, size: int = 8) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def all_bytes_under(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# --------------------------------------------------------------------------------------
# GTA5: a multi-part download with an audit
# --------------------------------------------------------------------------------------


def gta5_parts() -> dict[str, bytes]:
    """Three image and three label parts; part 2 holds bare file names (no images/ folder)."""
    return {
        "01_images.zip": make_zip({"images/00001.png": png(1), "images/00002.png": png(2)}),
        "01_labels.zip": make_zip({"labels/00001.png": png(11), "labels/00002.png": png(12)}),
        "02_images.zip": make_zip({"00003.png": png(3), "00004.png": png(4)}),
        "02_labels.zip": make_zip({"00003.png": png(13), "00004.png": png(14)}),
        "03_images.zip": make_zip({"images/00005.png": png(5), "images/00006.png": png(6)}),
        "03_labels.zip": make_zip({"labels/00005.png": png(15), "labels/00006.png": png(16)}),
    }


def tiny_gta5(server, parts: dict[str, bytes], expected: int = 6) -> dl.Dataset:
    """The real gta5 entry, its first parts only, served by the test server."""
    real = dl.get_dataset("gta5")
    resources = []
    for r in real.resources:
        if r.filename in parts:
            server.files[f"/from_games/{r.filename}"] = parts[r.filename]
            resources.append(dataclasses.replace(r, urls=(f"{server.url}/from_games/{r.filename}",),
                                                 approx_size=len(parts[r.filename]), extracted_size=1000))
    audit = dataclasses.replace(real.audit, expected=expected)
    return dataclasses.replace(real, resources=tuple(resources), audit=audit)


def test_gta5_multi_part_download_audit_and_skip(server, tmp_path):
    parts = gta5_parts()
    ds = tiny_gta5(server, parts)
    console = quiet()
    folder = dl.download(ds, tmp_path, console=console)
    text = output(console)
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"0000{i}.png" for i in range(1, 7)]
    assert sorted(p.name for p in (folder / "labels").iterdir()) == [f"0000{i}.png" for i in range(1, 7)]
    assert (folder / "images" / "00003.png").read_bytes() == png(3)  # the bare part went into images/
    assert not list(folder.glob("*.zip")) and not list(folder.glob("*.part"))  # archives removed once extracted
    # No published checksum: each part's sha256 is recorded on first download and said so.
    assert json.loads((folder / dl.SIDECAR).read_text()) == {name: sha(data) for name, data in parts.items()}
    assert "trust on first use" in text and "audit: 6 of 6 image/label pairs" in text

    n = len(server.requests)
    console = quiet()
    dl.download(ds, tmp_path, console=console)
    assert len(server.requests) == n and output(console).count("already extracted") == 6

    # A missing extracted file: only its part is fetched again; the recorded sha256 still matches.
    (folder / "labels" / "00004.png").unlink()
    dl.download(ds, tmp_path, console=quiet())
    assert [p for p, _ in server.requests[n:]] == ["/from_games/02_labels.zip"]
    assert (folder / "labels" / "00004.png").read_bytes() == png(14)


def test_gta5_changed_file_is_caught_against_the_first_download(server, tmp_path):
    parts = gta5_parts()
    ds = tiny_gta5(server, parts)
    folder = dl.download(ds, tmp_path, console=quiet())
    (folder / "images" / "00001.png").unlink()
    server.files["/from_games/01_images.zip"] = make_zip({"images/00001.png": png(99), "images/00002.png": png(2)})
    with pytest.raises(DownloadError, match=r"differs from the copy first downloaded.*remove its line") as e:
        dl.download(ds, tmp_path, console=quiet())
    assert "\n" not in str(e.value) and not (folder / "01_images.zip").exists()


def test_gta5_audit_reports_missing_and_unreadable_pairs(server, tmp_path):
    parts = gta5_parts()
    parts["03_labels.zip"] = make_zip({"labels/00005.png": png(15)[:40]})  # one cut short, one missing
    ds = tiny_gta5(server, parts)
    with pytest.raises(DownloadError) as e:
        dl.download(ds, tmp_path, console=quiet())
    message = str(e.value)
    assert "\n" not in message
    assert "4 of 6 image/label pairs" in message
    assert "1 images without a label (e.g. 00006.png)" in message
    assert "1 unreadable files (e.g. labels/00005.png)" in message


def test_verify_audits_without_downloading(server, tmp_path):
    ds = tiny_gta5(server, gta5_parts())
    with pytest.raises(DataError, match=r"gta5 is not in .*run: uda download gta5"):
        dl.verify_dataset(ds, tmp_path, console=quiet())
    folder = dl.download(ds, tmp_path, console=quiet())
    n = len(server.requests)
    console = quiet()
    dl.verify_dataset(ds, tmp_path, console=console)
    assert "gta5: verified" in output(console) and len(server.requests) == n

    img = folder / "images" / "00002.png"
    img.write_bytes(img.read_bytes()[:30])  # truncated in place
    (folder / "labels" / "00006.png").unlink()
    console = quiet()
    with pytest.raises(DataError) as e:
        dl.verify_dataset(ds, tmp_path, console=console)
    assert "\n" not in str(e.value) and "failed verification" in str(e.value)
    text = output(console)
    assert "01_images.zip: 1 extracted files changed size (e.g. images/00002.png)" in text
    assert "03_labels.zip: 1 extracted files missing (e.g. labels/00006.png)" in text
    assert "unreadable files (e.g. images/00002.png)" in text
    assert len(server.requests) == n  # --verify never downloads


# --------------------------------------------------------------------------------------
# Transfers: cut off and resumed, Range ignored, wrong checksum, 404 to the next mirror
# --------------------------------------------------------------------------------------


def payload_dataset(server, data: bytes, *, urls: tuple[str, ...] | None = None, **changes) -> dl.Dataset:
    server.files["/files/blob.bin"] = data
    res = Resource("blob.bin", urls=urls or (f"{server.url}/files/blob.bin",), sha256=sha(data), size=len(data))
    return dl.Dataset("blob", "blob", "blob", (dataclasses.replace(res, **changes),))


def test_cut_off_transfer_resumes_with_a_range_request(server, tmp_path):
    data = os.urandom(300_000)
    ds = payload_dataset(server, data)
    server.cut_once["/files/blob.bin"] = 120_000
    console = quiet()
    dl.download(ds, tmp_path, console=console)
    assert server.ranges("/files/blob.bin") == [None, "bytes=120000-"]
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == data
    assert "resuming at 120,000 bytes" in output(console)


def test_server_that_ignores_range_is_read_again_from_zero(server, tmp_path):
    data = os.urandom(200_000)
    ds = payload_dataset(server, data)
    server.ignore_range = True
    server.cut_once["/files/blob.bin"] = 50_000
    console = quiet()
    dl.download(ds, tmp_path, console=console)
    assert server.ranges("/files/blob.bin") == [None, "bytes=50000-"]
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == data
    assert "starting again from zero" in output(console)


def test_wrong_checksum_deletes_the_file(server, tmp_path):
    data = os.urandom(10_000)
    ds = payload_dataset(server, data)
    server.corrupt.add("/files/blob.bin")
    with pytest.raises(DownloadError, match=r"sha256 checksum did not match.*deleted") as e:
        dl.download(ds, tmp_path, console=quiet())
    assert "\n" not in str(e.value) and list((tmp_path / "blob").iterdir()) == []


def test_mirror_404_falls_through_to_the_next_url(server, tmp_path):
    data = os.urandom(10_000)
    ds = payload_dataset(server, data)
    server.missing.add("/mirror/blob/blob.bin")
    console = quiet()
    dl.download(ds, tmp_path, mirrors=[f"{server.url}/mirror"], console=console)
    assert [p for p, _ in server.requests] == ["/mirror/blob/blob.bin", "/files/blob.bin"]
    assert "HTTP 404; trying the next URL" in output(console)
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == data


def test_a_web_page_instead_of_the_file_falls_through(server, tmp_path):
    """Google Drive's "cannot scan" page or a login page must not be saved as the archive."""
    data = os.urandom(10_000)
    server.files["/drive/blob.bin"] = b"<html>confirm the download</html>"
    server.html.add("/drive/blob.bin")
    ds = payload_dataset(server, data, urls=(f"{server.url}/drive/blob.bin", f"{server.url}/files/blob.bin"))
    console = quiet()
    dl.download(ds, tmp_path, console=console)
    assert "sent a web page, not the file" in output(console)
    assert (tmp_path / "blob" / "blob.bin").read_bytes() == data


# --------------------------------------------------------------------------------------
# Free disk space
# --------------------------------------------------------------------------------------


def test_refuses_to_start_without_the_space_needed(server, tmp_path, monkeypatch):
    ds = tiny_gta5(server, gta5_parts())
    ds = dataclasses.replace(ds, resources=tuple(
        dataclasses.replace(r, approx_size=3 * dl.GB, extracted_size=3 * dl.GB) for r in ds.resources))
    # Peak: everything extracted (6 x 3 GB) plus the last archive (3 GB) beside it.
    assert dl.space_needed(ds, tmp_path / "gta5") == 21 * dl.GB
    seen = []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: seen.append(p) or shutil._ntuple_diskusage(0, 0, 5 * dl.GB))
    with pytest.raises(DownloadError) as e:
        dl.download(ds, tmp_path / "new" / "root", console=quiet())
    message = str(e.value)
    assert "gta5 needs about 21 GB of free disk space" in message and "only 5.0 GB is free" in message
    assert f"under {tmp_path}" in message and seen == [tmp_path]  # the nearest folder that exists
    assert server.requests == [] and not (tmp_path / "new").exists()


def test_space_needed_counts_only_what_is_missing(server, tmp_path):
    parts = gta5_parts()
    ds = tiny_gta5(server, parts)
    folder = dl.download(ds, tmp_path, console=quiet())
    assert dl.space_needed(ds, folder) == 0
    (folder / "images" / "00001.png").unlink()
    r = ds.resources[0]
    assert dl.space_needed(ds, folder) == r.approx_size + r.extracted_size


# --------------------------------------------------------------------------------------
# Archives whose members try to escape
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("evil", ["../evil.png", "..\\evil.png", "/tmp/evil.png", "images/../../evil.png"])
def test_escaping_zip_members_refuse_the_archive(server, tmp_path, evil):
    parts = {"01_images.zip": make_zip({"images/00001.png": png(1), evil: b"evil"})}
    ds = tiny_gta5(server, parts)
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match=r"refusing to extract 01_images.zip.*nothing was extracted") as e:
        dl.download(ds, root, console=quiet())
    assert "\n" not in str(e.value)
    assert not (root / "gta5" / "images").exists()  # not even the good member
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert not Path("/tmp/evil.png").exists()


# --------------------------------------------------------------------------------------
# SYNTHIA: RAR through an external unpacker (a stand-in tool here)
# --------------------------------------------------------------------------------------

FAKE_RAR = """#!{python}
import base64, json, os, sys
cmd, archive = sys.argv[1], sys.argv[2]
spec = json.load(open(archive))
if cmd == "list":
    for name in spec["files"]:
        print(name)
elif cmd == "extract":
    dest = sys.argv[3]
    for name, data in spec["files"].items():
        path = os.path.join(dest, name)  # backslashes stay in the name, as unrar can leave them
        os.makedirs(os.path.dirname(path) or dest, exist_ok=True)
        open(path, "wb").write(base64.b64decode(data))
    for name, target in spec.get("links", {{}}).items():
        os.symlink(target, os.path.join(dest, name))
"""


@pytest.fixture
def fake_rar(tmp_path, monkeypatch):
    tool = tmp_path / "bin" / "fakerar"
    tool.parent.mkdir()
    tool.write_text(FAKE_RAR.format(python=sys.executable))
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(archives, "RAR_TOOLS", ((str(tool), ("list", "{archive}"), ("extract", "{archive}", "{dest}")),))
    return tool


def fake_rar_archive(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    spec = {"files": {k: base64.b64encode(v).decode() for k, v in files.items()}, "links": links or {}}
    return json.dumps(spec).encode()


def tiny_synthia(server, data: bytes, expected: int = 2) -> dl.Dataset:
    real = dl.get_dataset("synthia")
    server.files["/synthia/SYNTHIA_RAND_CITYSCAPES.rar"] = data
    res = dataclasses.replace(real.resources[0], urls=(f"{server.url}/synthia/SYNTHIA_RAND_CITYSCAPES.rar",),
                              approx_size=len(data), extracted_size=len(data))
    return dataclasses.replace(real, resources=(res,), audit=dataclasses.replace(real.audit, expected=expected))


def test_synthia_rar_is_unpacked_with_windows_names(server, tmp_path, fake_rar):
    files = {
        "RAND_CITYSCAPES\\RGB\\0000000.png": png(1), "RAND_CITYSCAPES\\RGB\\0000001.png": png(2),
        "RAND_CITYSCAPES\\GT\\LABELS\\0000000.png": png(3), "RAND_CITYSCAPES\\GT\\LABELS\\0000001.png": png(4),
    }
    ds = tiny_synthia(server, fake_rar_archive(files))
    console = quiet()
    folder = dl.download(ds, tmp_path, console=console)
    assert (folder / "RAND_CITYSCAPES" / "GT" / "LABELS" / "0000001.png").read_bytes() == png(4)
    assert "audit: 2 of 2 image/label pairs" in output(console)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".SYNTHIA_RAND_CITYSCAPES.rar.extracted", dl.SIDECAR, "RAND_CITYSCAPES"]  # no staging folder left


@pytest.mark.parametrize("case", ["dotdot", "symlink"])
def test_synthia_rar_escapes_are_refused(server, tmp_path, fake_rar, case):
    files = {"RAND_CITYSCAPES\\RGB\\0000000.png": png(1)}
    links = {}
    if case == "dotdot":
        files["..\\..\\evil.png"] = b"evil"
    else:
        links["RAND_CITYSCAPES_link"] = str(tmp_path)
    ds = tiny_synthia(server, fake_rar_archive(files, links))
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match=r"refusing to extract SYNTHIA_RAND_CITYSCAPES.rar") as e:
        dl.download(ds, root, console=quiet())
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (root / "synthia").iterdir()) == [dl.SIDECAR]  # nothing extracted, archive gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "root"]


def test_synthia_without_an_unpacker_keeps_the_archive(server, tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "RAR_TOOLS", (("no-such-unpacker-here", (), ()),))
    ds = tiny_synthia(server, fake_rar_archive({"RAND_CITYSCAPES\\RGB\\0000000.png": png(1)}))
    with pytest.raises(DownloadError, match=r"RAR archive.*install one of no-such-unpacker-here.*kept") as e:
        dl.download(ds, tmp_path, console=quiet())
    assert "\n" not in str(e.value)
    assert (tmp_path / "synthia" / "SYNTHIA_RAND_CITYSCAPES.rar").exists()


# --------------------------------------------------------------------------------------
# Cityscapes: a fake login site
# --------------------------------------------------------------------------------------

LOGIN_PAGE = b"""<html><form method="post" action="/login/">
<input name="username"><input type="password" name="password"><input type="submit" name="submit" value="Login">
</form></html>"""


def cityscapes_site(server, packages: dict[int, bytes], md5s: dict[int, str] | None = None):
    """/login/ (GET: the form and an anonymous cookie; POST: alice/PASSWORD -> 302 and a
    session cookie, else the form again), /md5-sum/ and /file-handling/ (a session cookie or a
    302 to the login page)."""
    state = {"posts": []}
    md5s = md5s or {k: hashlib.md5(v).hexdigest() for k, v in packages.items()}

    def send(h, code, body=b"", ctype="text/html", headers=()):
        h.send_response(code)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def login(h):
        if h.command == "GET":
            send(h, 200, LOGIN_PAGE, headers=[("Set-Cookie", "anon=1; Path=/")])
            return
        body = h.rfile.read(int(h.headers["Content-Length"])).decode()
        state["posts"].append(body)
        form = dict(urllib.parse.parse_qsl(body))
        assert "anon=1" in (h.headers.get("Cookie") or ""), "the form's cookie must come back with the POST"
        if form.get("username") == "alice" and form.get("password") == PASSWORD and form.get("submit") == "Login":
            send(h, 302, headers=[("Location", "/"), ("Set-Cookie", "sessionid=ok; Path=/")])
        else:
            send(h, 200, LOGIN_PAGE)

    def logged_in(h) -> bool:
        if "sessionid=ok" in (h.headers.get("Cookie") or ""):
            return True
        send(h, 302, headers=[("Location", "/login/")])
        return False

    def package_id(h) -> int:
        return int(urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)["packageID"][0])

    def md5(h):
        if logged_in(h):
            send(h, 200, f"{md5s[package_id(h)]}  file.zip\n".encode(), ctype="text/plain")

    def file(h):
        if logged_in(h):
            send(h, 200, packages[package_id(h)], ctype="application/zip")

    server.routes.update({"/login/": login, "/md5-sum/": md5, "/file-handling/": file})
    return state


def cityscapes_zips() -> dict[int, bytes]:
    return {
        1: make_zip({"README": b"gtFine readme", "license.txt": b"terms",
                     "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png": png(1),
                     "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png": png(2)}),
        3: make_zip({"README": b"leftImg8bit readme, longer", "license.txt": b"terms",
                     "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png": png(3),
                     "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png": png(4)}),
    }


def tiny_cityscapes(server) -> dl.Dataset:
    """The real entry with its site moved to the test server (same paths and package ids)."""
    real = dl.get_dataset("cityscapes")
    base = server.url + "/"

    def moved(url: str) -> str:
        return url.replace("https://www.cityscapes-dataset.com/", base)

    resources = tuple(dataclasses.replace(r, urls=tuple(moved(u) for u in r.urls), md5_url=moved(r.md5_url),
                                          approx_size=10_000, extracted_size=10_000) for r in real.resources)
    form = dataclasses.replace(real.login, url=moved(real.login.url), protects=base,
                               register_url=moved(real.login.register_url))
    return dataclasses.replace(real, resources=resources, login=form, audit=dataclasses.replace(real.audit, expected=2))


def assert_no_password(*texts: str, root: Path | None = None) -> None:
    for t in texts:
        assert PASSWORD not in t
        assert urllib.parse.quote_plus(PASSWORD) not in t
    if root is not None:
        assert PASSWORD.encode() not in all_bytes_under(root)


def test_cityscapes_login_success(server, tmp_path):
    state = cityscapes_site(server, cityscapes_zips())
    ds = tiny_cityscapes(server)
    console = quiet()
    folder = dl.download(ds, tmp_path, console=console, credentials=Credentials("alice", PASSWORD))
    text = output(console)
    assert "Cityscapes: logged in as alice" in text
    assert text.count("verified (md5 published by Cityscapes)") == 2
    assert (folder / "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png").read_bytes() == png(4)
    assert "audit: 2 of 2 image/label pairs" in text
    assert len(state["posts"]) == 1 and urllib.parse.quote_plus(PASSWORD) in state["posts"][0]  # only in the body
    assert_no_password(text, *server.targets, repr(Credentials("alice", PASSWORD)), root=tmp_path)

    # Both zips held a README: the second overwrote the first, yet neither is fetched again
    # (the skip check looks only at the folders each archive owns), and --verify passes offline.
    n = len(server.targets)
    dl.download(ds, tmp_path, console=quiet(), credentials=Credentials("alice", PASSWORD))
    assert len(server.targets) == n
    dl.verify_dataset(ds, tmp_path, console=quiet())


def test_cityscapes_wrong_password(server, tmp_path):
    state = cityscapes_site(server, cityscapes_zips())
    ds = tiny_cityscapes(server)
    console = quiet()
    with pytest.raises(DownloadError) as e:
        dl.download(ds, tmp_path, console=console, credentials=Credentials("alice", "wrong-" + PASSWORD))
    message = str(e.value)
    assert message == "Cityscapes login failed for user alice; check CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD"
    assert len(state["posts"]) == 1
    assert not any(t.startswith("/file-handling/") for t in server.targets)
    assert_no_password(message, output(console), *server.targets, root=tmp_path)
    assert "wrong-" not in message + output(console)


def test_cityscapes_without_credentials_says_what_to_do(server, tmp_path, monkeypatch):
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    cityscapes_site(server, cityscapes_zips())
    ds = tiny_cityscapes(server)
    with pytest.raises(DownloadError) as e:
        dl.download(ds, tmp_path, console=quiet())
    message = str(e.value)
    assert "\n" not in message
    assert "set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD" in message
    assert f"put them in {tmp_path / 'cityscapes'}/" in message and "gtFine_trainvaltest.zip" in message
    assert server.targets == []  # nothing was asked of the site without a login


def test_cityscapes_credentials_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CITYSCAPES_USERNAME", "alice")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
    cityscapes_site(server, cityscapes_zips())
    console = quiet()
    dl.download(tiny_cityscapes(server), tmp_path, console=console)
    assert "logged in as alice" in output(console)
    assert_no_password(output(console), root=tmp_path)


def test_cityscapes_zips_placed_by_hand_are_verified_and_extracted(server, tmp_path, monkeypatch):
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    cityscapes_site(server, cityscapes_zips())
    folder = tmp_path / "cityscapes"
    folder.mkdir()
    for pid, name in ((1, "gtFine_trainvaltest.zip"), (3, "leftImg8bit_trainvaltest.zip")):
        (folder / name).write_bytes(cityscapes_zips()[pid])
    console = quiet()
    dl.download(tiny_cityscapes(server), tmp_path, console=console)
    assert server.targets == []
    assert output(console).count("trust on first use") == 2
    assert (folder / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png").read_bytes() == png(1)


def test_cityscapes_zip_placed_by_hand_with_a_bad_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    data = bytearray(cityscapes_zips()[1])
    member = data.find(png(1))
    data[member + 20] ^= 0xFF  # the zip's own CRC-32 of that member no longer matches
    folder = tmp_path / "cityscapes"
    folder.mkdir()
    (folder / "gtFine_trainvaltest.zip").write_bytes(bytes(data))
    # The real cityscapes needs ~23 GB for the rest of its files; this test is about the CRC,
    # so the free-space check must not depend on the machine's disk (CI had 20 GB free).
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(0, 0, 10**6 * dl.GB))
    with pytest.raises(DownloadError, match=r"gtFine_trainvaltest.zip is not a readable archive.*CRC"):
        dl.download("cityscapes", tmp_path, console=quiet())


def test_cityscapes_md5_mismatch_deletes_the_download(server, tmp_path):
    cityscapes_site(server, cityscapes_zips(), md5s={1: "0" * 32, 3: "0" * 32})
    with pytest.raises(DownloadError, match=r"gtFine_trainvaltest.zip from .*md5 checksum did not match"):
        dl.download(tiny_cityscapes(server), tmp_path, console=quiet(), credentials=Credentials("alice", PASSWORD))
    assert not list((tmp_path / "cityscapes").glob("*.zip*"))


def test_cityscapes_command_keeps_the_password_out_of_all_output(server, tmp_path, monkeypatch, capsys):
    from test_cli import run

    cityscapes_site(server, cityscapes_zips())
    monkeypatch.setitem(dl.DATASETS, "cityscapes", tiny_cityscapes(server))
    monkeypatch.setenv("CITYSCAPES_USERNAME", "alice")
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "wrong-" + PASSWORD)
    code, out, err = run(["download", "cityscapes", "--data-root", str(tmp_path)], capsys)
    assert code == 1 and "Cityscapes login failed for user alice" in err
    assert len(err.strip().splitlines()) == 1
    assert_no_password(out, err, root=tmp_path)

    monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
    code, out, err = run(["download", "cityscapes", "--data-root", str(tmp_path)], capsys)
    assert code == 0, err
    assert_no_password(out, err, *server.targets, root=tmp_path)

    monkeypatch.delenv("CITYSCAPES_PASSWORD")
    code, out, err = run(["download", "cityscapes", "--data-root", str(tmp_path / "other")], capsys)
    assert code == 1 and "set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD" in err  # no prompt off a terminal


# --------------------------------------------------------------------------------------
# --list and --verify from the command line
# --------------------------------------------------------------------------------------


def test_list_shows_every_dataset_and_its_status(server, tmp_path, monkeypatch, capsys):
    from test_cli import run

    monkeypatch.setitem(dl.DATASETS, "gta5", tiny_gta5(server, gta5_parts()))
    code, out, err = run(["download", "--list", "--data-root", str(tmp_path)], capsys)
    assert code == 0, err
    for name in dl.list_datasets():
        assert f"\n{name}  absent" in out
    assert "unverified: no published checksum (sha256 recorded on first download)" in out
    assert "md5 read from the site after login" in out and "CITYSCAPES_PASSWORD" in out
    assert "CC BY-NC-SA 3.0" in out and "≈59 GB" not in out  # the tiny gta5 replaced the real one
    assert server.requests == []

    dl.download("gta5", tmp_path, console=quiet())
    code, out, _ = run(["download", "--list", "gta5", "--data-root", str(tmp_path)], capsys)
    assert code == 0 and "gta5  present, verified" in out and "mnist" not in out

    (tmp_path / "gta5" / "labels" / "00001.png").unlink()
    code, out, _ = run(["download", "--list", "gta5", "--data-root", str(tmp_path)], capsys)
    assert "gta5  partial: 5 of 6 files" in out


def test_verify_from_the_command_line(server, tmp_path, monkeypatch, capsys):
    from test_cli import run

    monkeypatch.setitem(dl.DATASETS, "gta5", tiny_gta5(server, gta5_parts()))
    code, _, err = run(["download", "gta5", "--verify", "--data-root", str(tmp_path)], capsys)
    assert code == 1 and "gta5 is not in" in err
    code, _, err = run(["download", "gta5", "--data-root", str(tmp_path)], capsys)
    assert code == 0, err
    n = len(server.requests)
    code, _, err = run(["download", "gta5", "--verify", "--data-root", str(tmp_path)], capsys)
    assert code == 0 and "gta5: verified" in err and len(server.requests) == n
    code, _, err = run(["download", "gta5", "--verify", "--force"], capsys)
    assert code == 2 and "--force: --list and --verify fetch nothing" in err


# --------------------------------------------------------------------------------------
# Office-31: download, readers, domains
# --------------------------------------------------------------------------------------

def office_tree(per_class: dict[str, int]) -> dict[str, bytes]:
    from uda_cli.data.office import OFFICE31_CLASSES

    files = {}
    for d, (domain, n) in enumerate(per_class.items()):
        for c, name in enumerate(OFFICE31_CLASSES):
            for i in range(n):
                files[f"{domain}/images/{name}/frame_{i:04d}.jpg"] = jpeg(seed=1000 * d + 10 * c + i)
    return files


def test_office31_download_and_audit(server, tmp_path):
    files = office_tree({"amazon": 2, "webcam": 1, "dslr": 1})
    archive = make_tar(list(files.items()))
    real = dl.get_dataset("office31")
    server.files["/drive/office.tar.gz"] = archive
    res = dataclasses.replace(real.resources[0], urls=(f"{server.url}/drive/office.tar.gz",))
    ds = dataclasses.replace(real, resources=(res,),
                             audit=dl.ClassFolderAudit((("amazon", 62), ("webcam", 31), ("dslr", 31)), classes=31))
    console = quiet()
    dl.download(ds, tmp_path, console=console)
    assert "audit: 124 of 124 images" in output(console)
    assert "trust on first use" in output(console)


def write_office(root: Path, per_class: dict[str, int], nested: bool = True) -> Path:
    for rel, data in office_tree(per_class).items():
        if not nested:
            rel = rel.replace("/images/", "/")
        path = root / "office31" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root / "office31"


def test_office31_reader_and_domains(tmp_path):
    from uda_cli.data.office import OFFICE31_CLASSES, read_office31
    from uda_cli.data.registry import get_domain, load_domain

    folder = write_office(tmp_path, {"amazon": 2, "dslr": 1})
    images, labels = read_office31(folder, "amazon", "all")
    assert images.shape == (62, 224, 224, 3) and images.dtype == np.uint8
    assert labels.tolist() == [c for c in range(31) for _ in range(2)]  # alphabetical folder order
    assert OFFICE31_CLASSES[0] == "back_pack" and OFFICE31_CLASSES[-1] == "trash_can"

    spec = get_domain("office31-dslr")
    assert spec.classes == OFFICE31_CLASSES and spec.image_size == (224, 224) and spec.channels == 3
    assert spec.splits == ("all",) and spec.train_split == spec.eval_split == "all" and spec.dataset == "office31"
    x, y = load_domain("office31-dslr", "all", tmp_path)
    assert tuple(x.shape) == (31, 3, 224, 224) and y.tolist() == list(range(31))

    with pytest.raises(DataError, match=r"Office-31 folder .*webcam/images not found; run: uda download office31"):
        read_office31(folder, "webcam", "all")
    with pytest.raises(DataError, match="one split: all"):
        read_office31(folder, "amazon", "train")


def test_office31_reader_problems_are_one_line(tmp_path):
    from uda_cli.data.office import read_office31

    folder = write_office(tmp_path, {"webcam": 1}, nested=False)  # <domain>/<class>/ is read too
    assert read_office31(folder, "webcam", "all")[0].shape[0] == 31
    next((folder / "webcam" / "mug").iterdir()).write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(DataError, match=r"Office-31 image .*frame_0000.jpg is not readable.*--force") as e:
        read_office31(folder, "webcam", "all")
    assert "\n" not in str(e.value)
    for p in (folder / "webcam" / "ruler").iterdir():
        p.unlink()
    (folder / "webcam" / "ruler").rmdir()
    with pytest.raises(DataError, match="missing class folders: ruler"):
        read_office31(folder, "webcam", "all")


# --------------------------------------------------------------------------------------
# ResNet-50 backbone
# --------------------------------------------------------------------------------------


def test_resnet50_without_pretrained_weights(tmp_path, monkeypatch):
    import torch

    from uda_cli.models.classifiers import resnet50_backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    f, c = resnet50_backbone(31, pretrained=False)
    f.eval(), c.eval()
    with torch.no_grad():
        feats = f(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert feats.shape == (2, 2048) and c(feats).shape == (2, 31)
    assert not (tmp_path / "torch").exists()  # nothing fetched or created


def test_resnet50_missing_weights_is_one_line_saying_how_to_get_them(tmp_path, monkeypatch):
    from uda_cli.models.classifiers import ResNet50Encoder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UDAError) as e:
        ResNet50Encoder(pretrained=True)
    message = str(e.value)
    assert "\n" not in message
    assert f"not found at {tmp_path / 'torch' / 'hub' / 'checkpoints' / 'resnet50-0676ba61.pth'}" in message
    assert "TORCH_HOME" in message and "ResNet50_Weights.IMAGENET1K_V1" in message


def test_resnet50_loads_cached_weights_through_torchvision(tmp_path, monkeypatch):
    import torch
    from torchvision.models import resnet50

    from uda_cli.models import classifiers as resnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = resnet.weights_path()
    path.parent.mkdir(parents=True)
    reference = resnet50(weights=None)
    torch.save(reference.state_dict(), path)
    # A stand-in file cannot have the real file's sha256 prefix: that check has its own test.
    with pytest.raises(UDAError, match=r"is damaged \(its sha256 does not start with 0676ba61\)"):
        resnet.ResNet50Encoder(pretrained=True)
    monkeypatch.setattr(resnet, "check_weights_file", lambda p: None)
    enc = resnet.ResNet50Encoder(pretrained=True)
    assert torch.equal(enc.net.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    enc.eval(), reference.eval()
    with torch.no_grad():  # [-1, 1] input is mapped to ImageNet normalisation first
        mean = torch.tensor(resnet.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(resnet.IMAGENET_STD).view(1, 3, 1, 1)
        reference.fc = torch.nn.Identity()
        assert torch.allclose(enc(x), reference(((x + 1) / 2 - mean) / std), atol=1e-5)


# --------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------


def test_image_file_ok(tmp_path):
    good_png, good_jpg = tmp_path / "a.png", tmp_path / "a.jpg"
    good_png.write_bytes(png(1))
    good_jpg.write_bytes(jpeg(1))
    assert dl.image_file_ok(good_png) and dl.image_file_ok(good_jpg)
    for name, data in (("cut.png", png(1)[:-5]), ("cut.jpg", jpeg(1)[:-200]), ("x.png", b"hello"),
                       ("empty.png", b"")):
        (tmp_path / name).write_bytes(data)
        assert not dl.image_file_ok(tmp_path / name), name
    assert not dl.image_file_ok(tmp_path / "missing.png")


def test_every_new_dataset_declares_its_layout_and_no_invented_checksum():
    for name in ("office31", "gta5", "synthia", "cityscapes"):
        ds = dl.get_dataset(name)
        assert "layout <root>/" in ds.description and ds.audit is not None
        assert all(r.checksum is None for r in ds.resources)  # none published: nothing invented
        assert all(r.urls and r.download_size for r in ds.resources)
    gta5 = dl.get_dataset("gta5")
    assert [r.filename for r in gta5.resources[:4]] == ["01_images.zip", "01_labels.zip", "02_images.zip",
                                                        "02_labels.zip"]
    assert len(gta5.resources) == 20 and gta5.audit.expected == 24_966
    assert gta5.resources[-1].urls == ("https://download.visinf.tu-darmstadt.de/data/from_games/data/10_labels.zip",)
    city = dl.get_dataset("cityscapes")
    assert [r.urls[0][-11:] for r in city.resources] == ["packageID=1", "packageID=3"]  # gtFine, leftImg8bit
    assert repr(Credentials("u", PASSWORD)) == "Credentials(username='u')"
