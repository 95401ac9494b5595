"""`uda download` against a local HTTP server serving the real files in ../shared/data.

The server (127.0.0.1, a free port) supports Range requests and can be told to cut a
transfer off once, to ignore Range, to answer 404, to serve corrupted bytes or a web page,
and to hand chosen paths to a function (test_download_datasets.py builds a fake login site
on that). Nothing here reaches beyond 127.0.0.1 (an autouse fixture refuses other hosts) or
writes outside tmp_path. Archives are small tarballs built in the test, never the large
MNIST-M ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import stat
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
from rich.console import Console

from uda_cli.data import download as dl
from uda_cli.data.download import Dataset, Resource, transfer
from uda_cli.errors import DownloadError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"no shared data at {SHARED}")

T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# --------------------------------------------------------------------------------------
# A small HTTP server with Range support and failure switches
# --------------------------------------------------------------------------------------


@dataclass
class ServerState:
    root: Path
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> bytes (test-made files)
    cut_once: dict[str, int] = field(default_factory=dict)  # URL path -> bytes sent before a cut
    stall_once: dict[str, int] = field(default_factory=dict)  # URL path -> bytes sent before a stall
    missing: set[str] = field(default_factory=set)  # URL paths answered with 404
    corrupt: set[str] = field(default_factory=set)  # URL paths served with one byte flipped
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    # URL path -> a function given the request handler, for GET and POST (a fake login site).
    routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)  # every request's target, query included
    html: set[str] = field(default_factory=set)  # URL paths served as a web page (text/html)

    def body(self, path: str) -> bytes | None:
        if path in self.files:
            return self.files[path]
        file = (self.root / path.lstrip("/")).resolve()
        if self.root.resolve() not in file.parents or not file.is_file():
            return None
        return file.read_bytes()

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a cut-off is seen by the client as EOF.
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        st: ServerState = self.server.state  # type: ignore[attr-defined]
        st.targets.append(self.path)
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path in st.routes:
            st.routes[path](self)
        else:
            self.send_error(405)

    def do_GET(self) -> None:
        st: ServerState = self.server.state  # type: ignore[attr-defined]
        st.targets.append(self.path)
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path in st.routes:
            st.routes[path](self)
            return
        range_header = self.headers.get("Range")
        st.requests.append((path, range_header))
        body = None if path in st.missing else st.body(path)
        if body is None:
            self.send_error(404)
            return
        if path in st.corrupt:
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0xFF
            body = bytes(flipped)
        start = 0
        if range_header and not st.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8" if path in st.html else "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        data = body[start:]
        if path in st.stall_once:  # send a little, then go quiet past the client's timeout
            self.wfile.write(data[: st.stall_once.pop(path)])
            self.wfile.flush()
            time.sleep(1.0)
            return
        cut = st.cut_once.pop(path, None)
        self.wfile.write(data if cut is None else data[:cut])  # then the connection closes


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Refuse any URL that is not 127.0.0.1 or file://, and bypass proxies."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    real_open = transfer._open

    def guarded(request, opener=None):
        parts = urllib.parse.urlsplit(request.full_url)
        if parts.scheme != "file" and parts.hostname != "127.0.0.1":
            raise urllib.error.URLError(f"network disabled in tests ({parts.hostname})")
        return real_open(request, opener)

    monkeypatch.setattr(transfer, "_open", guarded)  # the one call that touches the network
    monkeypatch.setattr(transfer, "TIMEOUT_S", 5.0)


@pytest.fixture
def server(tmp_path):
    state = ServerState(root=SHARED if SHARED.is_dir() else tmp_path)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield state
    httpd.shutdown()
    httpd.server_close()


def quiet() -> Console:
    return Console(file=io.StringIO(), width=300)


def output(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def offline(ds: Dataset, keep: tuple[str, ...] | None = None, **changes) -> Dataset:
    """``ds`` with no official URLs (only mirrors reach a file), optionally fewer resources."""
    resources = tuple(
        dataclasses.replace(r, urls=()) for r in ds.resources if keep is None or r.filename in keep
    )
    return dataclasses.replace(ds, resources=resources, **changes)


def mnist_t10k() -> Dataset:
    return offline(dl.get_dataset("mnist"), keep=T10K)


def usps_test(url: str) -> Dataset:
    """USPS test file only, fetched from ``url`` (a size is left out where a test needs it)."""
    ds = dl.get_dataset("usps")
    res = next(r for r in ds.resources if r.filename == "usps.t.bz2")
    return dataclasses.replace(ds, resources=(dataclasses.replace(res, urls=(url,)),))


# --------------------------------------------------------------------------------------
# Catalogue
# --------------------------------------------------------------------------------------


KNOWN = "cityscapes, gta5, mnist, mnistm, office31, svhn, synthia, usps"


def test_catalogue_shape():
    assert dl.list_datasets() == KNOWN.split(", ")
    for name in dl.list_datasets():
        ds = dl.get_dataset(name)
        assert ds.folder == name and ds.resources and ds.licence and ds.homepage
        for r in ds.resources:
            if r.checksum is None:  # no published checksum: it says why, or where the site shows it
                assert r.unpublished or r.md5_url
                continue
            algorithm, digest = r.checksum
            assert len(digest) == {"sha256": 64, "md5": 32}[algorithm]
    assert [r.required for r in dl.get_dataset("mnistm").resources] == [True, True, False]
    with pytest.raises(Exception, match=f"known datasets: {KNOWN}"):
        dl.get_dataset("office-31")


@pytest.mark.parametrize("first", ["uda_cli.data.download", "uda_cli.data.digits", "uda_cli.data.office",
                                   "uda_cli.data.gta5", "uda_cli.data.synthia", "uda_cli.data.cityscapes",
                                   "uda_cli.data.domains"])
def test_catalogue_loads_without_torch_whichever_module_comes_first(first):
    """The dataset modules declare their files with download.types, and the catalogue imports
    them: no import order may find a half-built module, and none of it may load torch
    (``uda download --list`` stays fast)."""
    import subprocess
    import sys

    code = (f"import sys, importlib; importlib.import_module({first!r}); "
            "from uda_cli.data.download import DATASETS, download; "
            f"assert ', '.join(sorted(DATASETS)) == {KNOWN!r}, sorted(DATASETS); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@needs_shared
def test_catalogue_checksums_match_shared_files():
    """The declared sha256s and sizes are those of the real files in shared/data."""
    for name in ("mnist", "usps", "mnistm"):
        ds = dl.get_dataset(name)
        for r in ds.resources:
            path = SHARED / ds.mirror_dir / r.filename
            if not path.exists():  # usps.bz2 is not in shared/data
                continue
            assert path.stat().st_size == r.size
            if r.size < 5_000_000:  # hashing the big MNIST-M archives would slow the suite
                assert dl.verify(path, r), path


def test_mirror_urls_come_first():
    ds = dl.get_dataset("mnist")
    urls = dl.candidate_urls(ds, ds.resources[0], ["http://m.example/data/"])
    assert urls[0] == "http://m.example/data/mnist/train-images-idx3-ubyte.gz"
    assert urls[1].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert dl.mirror_url("/some/dir", "mnist_m", "a.tar.gz") == "file:///some/dir/mnist_m/a.tar.gz"


# --------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------


@needs_shared
def test_download_verifies_then_skips(server, tmp_path):
    console = quiet()
    folder = dl.download(mnist_t10k(), tmp_path, mirrors=[server.url], console=console)
    assert folder == tmp_path / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(T10K)  # no .part left behind
    for name in T10K:
        assert sha256(folder / name) == sha256(SHARED / "mnist" / name)
    assert "verified (sha256)" in output(console)

    n = len(server.requests)
    console = quiet()
    dl.download(mnist_t10k(), tmp_path, mirrors=[server.url], console=console)
    assert len(server.requests) == n  # nothing fetched again
    assert output(console).count("already verified") == 2


@needs_shared
def test_cut_off_transfer_resumes_with_range(server, tmp_path):
    path = "/mnist/t10k-images-idx3-ubyte.gz"
    server.cut_once[path] = 400_000
    console = quiet()
    dl.download(mnist_t10k(), tmp_path, mirrors=[server.url], console=console)
    assert server.ranges(path) == [None, "bytes=400000-"]
    assert sha256(tmp_path / "mnist" / path.rsplit("/", 1)[1]) == dl.get_dataset("mnist").resources[2].sha256
    assert "resuming" in output(console)


@needs_shared
def test_stalled_transfer_times_out_and_resumes(server, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "TIMEOUT_S", 0.3)
    path = "/usps/usps.t.bz2"
    server.stall_once[path] = 200_000
    dl.download(usps_test(server.url + path), tmp_path, console=quiet())
    assert server.ranges(path) == [None, "bytes=200000-"]
    assert (tmp_path / "usps" / "usps.t.bz2").read_bytes() == (SHARED / "usps" / "usps.t.bz2").read_bytes()


@needs_shared
def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    folder = tmp_path / "usps"
    folder.mkdir()
    original = (SHARED / "usps" / "usps.t.bz2").read_bytes()
    (folder / "usps.t.bz2.part").write_bytes(original[:1000])
    dl.download(usps_test(server.url + "/usps/usps.t.bz2"), tmp_path, console=quiet())
    assert server.ranges("/usps/usps.t.bz2") == ["bytes=1000-"]
    assert (folder / "usps.t.bz2").read_bytes() == original
    assert not (folder / "usps.t.bz2.part").exists()


@needs_shared
def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    path = "/usps/usps.t.bz2"
    server.ignore_range = True
    server.cut_once[path] = 300_000
    console = quiet()
    dl.download(usps_test(server.url + path), tmp_path, console=console)
    assert server.ranges(path) == [None, "bytes=300000-"]  # asked to resume, got a 200
    assert (tmp_path / "usps" / "usps.t.bz2").read_bytes() == (SHARED / "usps" / "usps.t.bz2").read_bytes()
    assert "starting again from zero" in output(console)


@needs_shared
def test_416_means_the_partial_file_is_complete(server, tmp_path):
    path = "/usps/usps.t.bz2"
    ds = usps_test(server.url + path)
    ds = dataclasses.replace(ds, resources=(dataclasses.replace(ds.resources[0], size=None),))
    folder = tmp_path / "usps"
    folder.mkdir()
    (folder / "usps.t.bz2.part").write_bytes((SHARED / "usps" / "usps.t.bz2").read_bytes())
    dl.download(ds, tmp_path, console=quiet())
    assert server.ranges(path) == [f"bytes={(SHARED / 'usps' / 'usps.t.bz2').stat().st_size}-"]
    assert dl.verify(folder / "usps.t.bz2", ds.resources[0])


@needs_shared
def test_corrupted_file_is_deleted(server, tmp_path):
    path = "/usps/usps.t.bz2"
    server.corrupt.add(path)
    with pytest.raises(DownloadError, match=r"checksum did not match.*deleted.*--mirror") as e:
        dl.download(usps_test(server.url + path), tmp_path, console=quiet())
    assert "\n" not in str(e.value)
    assert list((tmp_path / "usps").iterdir()) == []


@needs_shared
def test_existing_bad_file_is_fetched_again(server, tmp_path):
    folder = tmp_path / "usps"
    folder.mkdir()
    (folder / "usps.t.bz2").write_bytes(b"not the real file")
    console = quiet()
    dl.download(usps_test(server.url + "/usps/usps.t.bz2"), tmp_path, console=console)
    assert "did not match its sha256 and was deleted" in output(console)
    assert (folder / "usps.t.bz2").read_bytes() == (SHARED / "usps" / "usps.t.bz2").read_bytes()


@needs_shared
def test_404_falls_through_to_the_next_url(server, tmp_path):
    server.missing.add("/gone/usps.t.bz2")
    ds = usps_test("unused")
    res = dataclasses.replace(
        ds.resources[0], urls=(server.url + "/gone/usps.t.bz2", server.url + "/usps/usps.t.bz2")
    )
    dl.download(dataclasses.replace(ds, resources=(res,)), tmp_path, console=quiet())
    assert [p for p, _ in server.requests] == ["/gone/usps.t.bz2", "/usps/usps.t.bz2"]
    assert dl.verify(tmp_path / "usps" / "usps.t.bz2", res)


def test_all_urls_failing_is_one_line_listing_them(server, tmp_path):
    res = Resource("x.bin", urls=(server.url + "/nope/x.bin", "http://127.0.0.1:9/x.bin"), sha256="0" * 64)
    ds = Dataset("tiny", "tiny", "tiny", (res,))
    with pytest.raises(DownloadError) as e:
        dl.download(ds, tmp_path, console=quiet())
    message = str(e.value)
    assert "\n" not in message
    assert "/nope/x.bin (HTTP 404)" in message and "127.0.0.1:9/x.bin" in message


def test_mnistm_without_a_mirror_says_how_to_pass_one(tmp_path):
    with pytest.raises(DownloadError, match=r"no official checksummed download.*--mirror") as e:
        dl.download("mnistm", tmp_path, console=quiet())
    assert "\n" not in str(e.value)


@needs_shared
def test_folder_and_file_url_mirrors(tmp_path):
    dl.download(mnist_t10k(), tmp_path / "a", mirrors=[str(SHARED)], console=quiet())
    dl.download(mnist_t10k(), tmp_path / "b", mirrors=[SHARED.as_uri()], console=quiet())
    for root in ("a", "b"):
        for name in T10K:
            assert sha256(tmp_path / root / "mnist" / name) == sha256(SHARED / "mnist" / name)


@needs_shared
def test_progress_bar_on_a_terminal(server, tmp_path):
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    dl.download(mnist_t10k(), tmp_path, mirrors=[server.url], console=console)
    assert dl.verify(tmp_path / "mnist" / T10K[0], mnist_t10k().resources[0])


# --------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def archive_dataset(server: ServerState, name: str, data: bytes, required: bool = True) -> Dataset:
    server.files[f"/arch/{name}"] = data
    res = Resource(name, urls=(f"{server.url}/arch/{name}",), sha256=hashlib.sha256(data).hexdigest(),
                   extract=True, required=required)
    return Dataset("arch", "arch", "arch", (res,))


def test_archive_is_extracted_marked_and_skipped(server, tmp_path):
    data = make_tar([("digits/a.txt", b"a"), ("digits/sub/b.txt", b"bb"), ("labels.txt", b"x 1\n")])
    ds = archive_dataset(server, "digits.tar.gz", data)
    folder = dl.download(ds, tmp_path, console=quiet())
    assert (folder / "digits" / "sub" / "b.txt").read_bytes() == b"bb"
    assert (folder / "labels.txt").read_bytes() == b"x 1\n"
    assert not (folder / "digits.tar.gz").exists()  # removed once extracted
    assert (folder / ".digits.tar.gz.extracted").exists()

    n = len(server.requests)
    console = quiet()
    dl.download(ds, tmp_path, console=console)
    assert len(server.requests) == n and "already extracted" in output(console)

    (folder / "digits" / "a.txt").unlink()  # an extracted file went missing: fetch again
    dl.download(ds, tmp_path, console=quiet())
    assert (folder / "digits" / "a.txt").read_bytes() == b"a"


def test_optional_archive_is_skipped_with_no_optional(server, tmp_path):
    ds = archive_dataset(server, "big.tar.gz", make_tar([("x.txt", b"x")]), required=False)
    dl.download(ds, tmp_path, include_optional=False, console=quiet())
    assert server.requests == [] and list((tmp_path / "arch").iterdir()) == []


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _hardlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


UNSAFE_TAR = {
    "dotdot": lambda tmp: ("../evil", b"evil"),
    "absolute": lambda tmp: (str(tmp / "evil"), b"evil"),
    "symlink": lambda tmp: _symlink("evil", str(tmp)),
    "hardlink": lambda tmp: _hardlink("evil", "../evil"),
    "device": lambda tmp: _device("evil"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE_TAR))
def test_unsafe_tar_member_refuses_the_whole_archive(server, tmp_path, kind):
    evil = UNSAFE_TAR[kind](tmp_path)
    # The safe member comes first: it must not be written either.
    data = make_tar([("good/first.txt", b"ok"), evil])
    ds = archive_dataset(server, "evil.tar.gz", data)
    root = tmp_path / "root"
    refused = r"refusing to extract evil.tar.gz: member '.*evil.*'.*archive was deleted"
    with pytest.raises(DownloadError, match=refused) as e:
        dl.download(ds, root, console=quiet())
    assert "\n" not in str(e.value)
    assert list((root / "arch").iterdir()) == []  # nothing extracted, bad archive removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]  # nothing landed outside


def test_link_already_on_disk_cannot_redirect_a_member(tmp_path):
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    archive = tmp_path / "a.tar"
    archive.write_bytes(make_tar([("sub/evil.txt", b"evil")]))
    with pytest.raises(DownloadError, match="outside the target folder"):
        dl.safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


def make_zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def test_zip_extraction_and_refusals(tmp_path):
    good = tmp_path / "good.zip"
    good.write_bytes(make_zip([("d/a.txt", b"a"), ("d/b.txt", b"b")]))
    assert dl.safe_extract(good, tmp_path / "out") == ["d/a.txt", "d/b.txt"]
    assert (tmp_path / "out" / "d" / "b.txt").read_bytes() == b"b"

    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    for entries in ([("../evil", b"x")], [("/abs/evil", b"x")], [(link, b"/etc")]):
        bad = tmp_path / "bad.zip"
        bad.write_bytes(make_zip([("ok.txt", b"ok"), *entries]))
        with pytest.raises(DownloadError, match="refusing to extract bad.zip"):
            dl.safe_extract(bad, tmp_path / "bad_out")
        assert list((tmp_path / "bad_out").iterdir()) == []
    assert not (tmp_path / "evil").exists()


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def _app():
    import typer

    from uda_cli.cli.download import download

    app = typer.Typer()
    app.command("download")(download)

    @app.callback()
    def _root() -> None:  # keeps `download` a subcommand, as in the real app
        pass

    return app


@needs_shared
def test_command_downloads_mnist_from_a_mirror(server, tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(
        _app(), ["download", "mnist", "--data-root", str(tmp_path), "--mirror", server.url]
    )
    assert result.exit_code == 0, result.output
    for r in dl.get_dataset("mnist").resources:
        assert sha256(tmp_path / "mnist" / r.filename) == r.sha256
    assert all(p.startswith("/mnist/") for p, _ in server.requests)


def test_command_rejects_unknown_datasets_and_bad_mirrors(tmp_path):
    from pydantic import ValidationError
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(_app(), ["download", "mnist", "office-31", "--data-root", str(tmp_path)])
    assert isinstance(result.exception, ValidationError)
    assert f"known datasets: {KNOWN}" in str(result.exception)

    result = runner.invoke(_app(), ["download", "--data-root", str(tmp_path)])
    assert isinstance(result.exception, ValidationError)

    result = runner.invoke(_app(), ["download", "mnist", "--mirror", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, ValidationError) and "not a folder" in str(result.exception)

    result = runner.invoke(_app(), ["download", "mnistm", "--data-root", str(tmp_path)])
    assert isinstance(result.exception, DownloadError)
