"""One GPU lease's benchmark work in one device call, prepared here and collected there.

A task may be lent a GPU machine through the device tool for about 15 minutes of device time
in all, the machine's start included, at most 10 minutes a command, and the machine goes
back 30 s after a call ends. That is one call of real work, so it must be prepared before
the lease and must bring back what matters even when the work is cut off. Session 19 (the
first lease) spent five calls carrying data and wheels by hand, and its PixelDA run folders
stayed on the device, so the runs that collapsed could not be probed afterwards.

Here, before the lease (stdlib only; needs pip and the registry for the wheels)::

    python tools/lease.py pack

copies the digit datasets the jobs read (MNIST, USPS, the SVHN subset: ~19 MB; MNIST-M's
128 MB of archives do not fit in a call's 64 MiB) from ``../shared/data`` into ``.lease/data``
and downloads into ``.whl/`` the wheels the device image lacks (pydantic and its three
needs, typing_extensions included, at the versions this environment runs), then prints the device call to make. Both
folders are git-ignored; the call names them in ``carry``.

There, in one call (``run`` with ``carry: [".whl", ".lease"]``)::

    python3 tools/lease.py run tools/lease_jobs.txt --parallel 11 --seconds 420 -- --budget paper --device cuda

installs the wheels into /tmp/site when ``import pydantic`` fails, runs the jobs file through
``tools/queue.sh`` (N ``digits.py`` jobs at a time), and at ``--seconds`` stops what is
still running with SIGTERM: each trainer then writes a checkpoint of the step it reached
(``digits.py`` runs save no other). It then writes into ``$OUT`` (the device tool brings back
at most 8 files of 16 MiB): ``lease.log`` (the machine, the queue's log, what was cut),
``table.md`` (``digits.py --from-json`` of the finished jobs), ``curves.md`` (``curves.py`` on
every run folder that logged an evaluation: a cut-off run's course) and
``runs.tar.gz`` (split into ``runs.tar.gz.partNN`` past 15 MiB): every job's rows and log and
every run folder's config, metrics and evaluations, plus the newest weights (no optimizer
state) of the runs whose method is in ``--weights`` (default pixelda), dropped largest
first, and said so in lease.log, where the archive would pass ``--max-mib``.

Back here: ``cat parts > runs.tar.gz; tar xzf runs.tar.gz``; each run folder then reads with
``uda evaluate``, ``tools/curves.py`` and ``tools/translation_probe.py``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = ("mnist", "usps", "svhn")  # MNIST-M (128 MB) does not fit in one call's 64 MiB
# Missing from the device image (KINDS.md's package list; session 19 saw the same): pydantic
# and its needs. typing_extensions is there, but of a version unknown here, and pydantic_core
# imports names that only recent ones have (Sentinel): session 19 carried it too.
WHEELS = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PART_BYTES = 15 * 2**20
MAX_PARTS = 6  # the device tool brings back 8 files; lease.log, table.md, curves.md are the rest


class LeaseError(Exception):
    """One line saying what to do."""


def pack(shared: Path, dest: Path, wheels: Path, python_version: str, fetch_wheels: bool = True) -> int:
    """Copy the datasets into ``dest`` and fetch the wheels into ``wheels``; return the bytes
    that the call will carry."""
    missing = [n for n in DATA if not (shared / n).is_dir()]
    if missing:
        raise LeaseError(f"{shared} has no {', '.join(missing)}; pass --shared DIR, the folder holding ../shared/data's datasets")
    dest.mkdir(parents=True, exist_ok=True)
    for name in DATA:
        shutil.rmtree(dest / name, ignore_errors=True)
        shutil.copytree(shared / name, dest / name)  # a copy: symlinks out of the tree would not travel
    if fetch_wheels:
        wheels.mkdir(parents=True, exist_ok=True)
        for old in wheels.glob("*.whl"):
            old.unlink()
        pins = [f"{n}=={importlib.metadata.version(n)}" for n in WHEELS]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp",
               *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(wheels), *pins]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise LeaseError(f"pip download {' '.join(pins)} failed ({r.stderr.strip().splitlines()[-1:]}); "
                             "run it where the package registry answers")
    return sum(f.stat().st_size for d in (dest, wheels) if d.exists() for f in d.rglob("*") if f.is_file())


def ensure_packages(wheels: Path, site: Path) -> dict[str, str]:
    """Install the carried wheels into ``site`` when this python lacks pydantic; return the
    environment additions every child process needs."""
    probe = subprocess.run([sys.executable, "-c", "import pydantic"], capture_output=True)
    if probe.returncode == 0:
        return {}
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise LeaseError(f"this python has no pydantic and {wheels} holds no wheels; run "
                         "`python tools/lease.py pack` before the lease and carry .whl")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LeaseError(f"installing the carried wheels failed: {r.stderr.strip().splitlines()[-1:]}")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}


def machine_lines(env: dict[str, str]) -> list[str]:
    code = ("import platform, torch; print(platform.node(), platform.processor() or platform.machine(), "
            "'torch', torch.__version__, 'cuda', torch.cuda.is_available(), "
            "torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    return [f"machine: {(r.stdout or r.stderr).strip()}"]


def run_queue(jobs: Path, parallel: int, seconds: float, grace: float, work: Path, digits_args: list[str],
              env: dict[str, str], log: list[str]) -> bool:
    """Run the queue in its own process group until it ends or ``seconds`` pass; then SIGTERM
    the group (each trainer keeps a checkpoint), SIGKILL after ``grace``. True if cut."""
    cmd = ["bash", str(REPO / "tools" / "queue.sh"), str(jobs), str(parallel), str(work / "q"), *digits_args]
    log.append("queue: " + " ".join(cmd))
    with open(work / "queue.out", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, "PYTHON": sys.executable},
                                start_new_session=True)
        try:
            proc.wait(timeout=seconds)
            log.append(f"queue ended by itself, rc {proc.returncode}")
            return False
        except subprocess.TimeoutExpired:
            pass
        log.append(f"deadline {seconds:g} s: SIGTERM to the queue's jobs (each trainer keeps its step)")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.append(f"still running {grace:g} s later: SIGKILL")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(1)  # the group's last writers
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group (a stuck child)
        except ProcessLookupError:
            pass
        return True


def run_folders(q: Path) -> list[Path]:
    return sorted(p.parent for p in q.glob("*.d*/*/config.json"))


def archive(q: Path, out: Path, weights_for: set[str], max_bytes: int, log: list[str],
            runs: list[Path] | None = None) -> list[Path]:
    """runs.tar.gz of the queue's rows, logs and run folders (``runs``, default every one under
    ``q``; newest weights of ``weights_for`` methods only, dropped largest first past
    ``max_bytes``), split into parts of 15 MiB."""
    small = [p for p in sorted(q.rglob("*")) if p.is_file() and not p.name.endswith(".safetensors")]
    weights = []
    for run in run_folders(q) if runs is None else runs:
        try:
            method = json.loads((run / "config.json").read_text()).get("method")
        except (OSError, json.JSONDecodeError):
            continue
        steps = sorted((run / "checkpoints").glob("step-*[0-9].safetensors"))
        if method in weights_for and steps:
            weights.append(steps[-1])

    def build(members: list[Path]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for p in members:
                tar.add(p, arcname=str(p.relative_to(q)))
        return buf.getvalue()

    def drop_biggest() -> None:
        biggest = max(weights, key=lambda p: p.stat().st_size)
        weights.remove(biggest)
        log.append(f"weights left behind (archive past {max_bytes / 2**20:.3g} MiB): {biggest.relative_to(q)}")

    # Float weights barely compress, so the small files' archive plus the weights' raw sizes
    # tells which weights fit without re-gzipping everything per dropped file; the loop after it
    # only settles the few bytes of tar headers and gzip overhead the estimate leaves out.
    base = len(build(small))
    while weights and base + sum(p.stat().st_size for p in weights) > max_bytes:
        drop_biggest()
    data = build(small + weights)
    while len(data) > max_bytes and weights:
        drop_biggest()
        data = build(small + weights)
    log.append(f"runs.tar.gz: {len(data) / 2**20:.1f} MiB, weights of {len(weights)} run(s)")
    if len(data) <= PART_BYTES:
        (out / "runs.tar.gz").write_bytes(data)
        return [out / "runs.tar.gz"]
    parts = []
    for i in range(0, len(data), PART_BYTES):
        part = out / f"runs.tar.gz.part{i // PART_BYTES:02d}"
        part.write_bytes(data[i:i + PART_BYTES])
        parts.append(part)
    return parts


def collect(work: Path, out: Path, weights_for: set[str], max_bytes: int, env: dict[str, str],
            log: list[str]) -> None:
    q = work / "q"
    rows = sorted(p for p in q.glob("*.json") if p.read_text().strip() not in ("", "[]"))
    py = [sys.executable]
    if rows:
        r = subprocess.run([*py, str(REPO / "benchmarks" / "digits.py"), "--from-json", *map(str, rows)],
                           capture_output=True, text=True, env=env)
        (out / "table.md").write_text(r.stdout + r.stderr)
    runs = run_folders(q)
    logged = [run for run in runs
              if '"kind": "eval"' in (run / "metrics.jsonl").read_text(errors="replace")]
    if logged:
        r = subprocess.run([*py, str(REPO / "tools" / "curves.py"), *map(str, logged)],
                           capture_output=True, text=True, env=env)
        (out / "curves.md").write_text(r.stdout + r.stderr)
    done = {p.stem for p in rows}
    for run in runs:
        job = run.parent.name.removesuffix(".d")
        if job not in done:
            ckpt = (run / "checkpoints" / "latest")
            log.append(f"cut or failed: {run.relative_to(q)} (checkpoint at "
                       f"{ckpt.read_text().strip() if ckpt.is_file() else 'none'})")
    if (q / "queue.log").is_file():
        log += ["--- queue.log"] + (q / "queue.log").read_text().splitlines()
    archive(q, out, weights_for, max_bytes, log, runs)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    digits_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, digits_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here, before the lease: data into .lease/data, wheels into .whl")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--dest", type=Path, default=REPO / ".lease" / "data")
    p.add_argument("--wheels", type=Path, default=REPO / ".whl")
    p.add_argument("--python-version", default="3.12", help="the device image's python (KINDS.md: 3.12)")
    p.add_argument("--no-wheels", action="store_true", help="copy the data only")
    r = sub.add_parser("run", help="there, in one call: the jobs, stopped at the deadline, collected into $OUT")
    r.add_argument("jobs", type=Path)
    r.add_argument("--parallel", type=int, default=8)
    r.add_argument("--seconds", type=float, required=True, help="stop the jobs this many seconds after the start")
    r.add_argument("--grace", type=float, default=60.0, help="seconds between SIGTERM and SIGKILL")
    r.add_argument("--out", type=Path, default=None, help="default: $OUT, the device tool's folder")
    r.add_argument("--work", type=Path, default=Path("/tmp/lease"))
    r.add_argument("--data", type=Path, default=REPO / ".lease" / "data")
    r.add_argument("--wheels", type=Path, default=REPO / ".whl")
    r.add_argument("--weights", default="pixelda", help="methods whose newest weights come back (comma list; '' none)")
    r.add_argument("--max-mib", type=float, default=MAX_PARTS * PART_BYTES / 2**20)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            if digits_args:
                raise LeaseError("pack takes no digits.py options; give them to `run` after --")
            n = pack(args.shared, args.dest, args.wheels, args.python_version, not args.no_wheels)
            if n > 60 * 2**20:
                raise LeaseError(f"{n / 2**20:.0f} MiB to carry, past a call's 64 MiB; carry fewer datasets")
            print(f"{n / 2**20:.1f} MiB in {args.dest} and {args.wheels}. The device call (carry: "
                  f'[".whl", ".lease"], timeout_s 600: 420 s of jobs, up to 60 s for them to stop, then the '
                  "collection):\n  python3 tools/lease.py run tools/lease_jobs.txt --parallel 11 "
                  "--seconds 420 -- --budget paper --device cuda")
            return 0
        out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        if out is None:
            raise LeaseError("no $OUT and no --out: give the folder the results go to")
        if not args.jobs.is_file():
            raise LeaseError(f"no jobs file {args.jobs}; pass a file of 'NAME digits.py-options' lines (tools/lease_jobs.txt)")
        if args.parallel < 1 or args.seconds <= 0:
            raise LeaseError("--parallel and --seconds must be positive")
        if not all((args.data / n).is_dir() for n in DATA):
            raise LeaseError(f"{args.data} lacks the datasets; run `python tools/lease.py pack` and carry .lease")
        if any(a == "--shared" or a.startswith("--shared=") for a in digits_args):
            raise LeaseError("the jobs read the carried data; leave --shared out of the digits.py options")
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(args.work, ignore_errors=True)
        args.work.mkdir(parents=True)
        log: list[str] = [f"started {time.strftime('%Y-%m-%d %H:%M:%S')}"]
        t0 = time.monotonic()
        try:
            extra = ensure_packages(args.wheels, args.work / "site")
            env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
            log += machine_lines(env) + ([f"installed the carried wheels ({extra['PYTHONPATH']})"] if extra else [])
            left = args.seconds - (time.monotonic() - t0)
            cut = run_queue(args.jobs, args.parallel, max(left, 1.0), args.grace, args.work,
                            ["--shared", str(args.data), "--data-root", str(args.work / "data"), *digits_args],
                            env, log)
            log.append("cut at the deadline" if cut else "every job ran to its end")
            collect(args.work, out, {m for m in args.weights.split(",") if m}, int(args.max_mib * 2**20), env, log)
        finally:
            log.append(f"ended after {time.monotonic() - t0:.0f} s")
            (out / "lease.log").write_text("\n".join(log) + "\n")
        return 0
    except LeaseError as e:
        print(f"lease.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
