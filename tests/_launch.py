"""One torchrun launch (2 processes, gloo, CPU) shared by test_distributed and test_preemption.

Starting torchrun and two workers costs far more than the tiny runs themselves, so every
multi-process scenario runs as one command of a single launch (``tests/_dist_entry.py``
runs ``::``-separated commands in the same processes). The launch runs once per pytest
session, on first use; each test then checks the artefacts of its own command(s).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENTRY = Path(__file__).resolve().parent / "_dist_entry.py"
REPO = ENTRY.parents[1]


def pythonpath() -> str:
    """PYTHONPATH for a subprocess: the repository first, then whatever the caller had (a
    machine whose packages come through PYTHONPATH, as on the GPU lease of session 19, where
    replacing it hid pydantic from 11 tests' subprocesses)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


B = 4  # per-rank batch; the single-process references use 2 * B

COMMON = ["--src", "tiny-src", "--tgt", "tiny-tgt", "--device", "cpu", "--batch-size", str(B)]


def commands(root: Path) -> dict[str, list[str]]:
    """Name -> argv of each command, in launch order."""
    return {
        "selftest": ["selftest"],
        # 2 x B vs 1 x 2B; evaluation during training sharded over the ranks
        "mlp": ["train", "--method", "test-mlp", *COMMON, "--steps", "30", "--eval-every", "10",
                "--out", str(root / "mlp"), "--log-format", "json"],
        # alternating updates of three optimizer groups
        "gan": ["train", "--method", "test-gan", *COMMON, "--steps", "8", "--eval-every", "0",
                "--out", str(root / "gan"), "--log-format", "text"],
        # the real methods: source-only (LeNet, dropout) and PixelDA (a GAN with batch norm)
        "source_only": ["train", "--method", "source-only", *COMMON, "--steps", "3", "--eval-every", "0",
                        "--out", str(root / "source_only"), "--log-format", "json"],
        "pixelda": ["train", "--method", "pixelda", *COMMON, "--steps", "3", "--eval-every", "0",
                    "--out", str(root / "pixelda"), "--log-format", "json",
                    "--set", "g_filters=8", "--set", "g_blocks=1", "--set", "d_filters=8"],
        # SIGTERM reaches rank 1 only, during step 13; both ranks must stop together
        "stop": ["UDA_TEST_SIGNAL_AT=13:15:1", "train", "--method", "test-mlp", *COMMON, "--steps", "40",
                 "--set", "dropout=0.3", "--save-every", "1000", "--eval-every", "0", "--out", str(root / "stop"),
                 "--log-format", "json"],
        "resume": ["train", "--method", "test-mlp", *COMMON, "--steps", "40", "--set", "dropout=0.3",
                   "--save-every", "1000", "--eval-every", "0", "--out", str(root / "stop"), "--resume", "auto",
                   "--log-format", "json"],
        "reference": ["train", "--method", "test-mlp", *COMMON, "--steps", "40", "--set", "dropout=0.3",
                      "--save-every", "1000", "--eval-every", "0", "--out", str(root / "reference"),
                      "--log-format", "json"],
        # `uda evaluate` on two processes
        "evaluate": ["evaluate", str(root / "mlp"), "--device", "cpu", "--json", str(root / "mlp_eval.json")],
        # segmentation: streamed digit scenes sharded over the ranks, evaluation sharded too
        "seg": ["train", "--method", "source-only", "--src", "mnist-scenes-mini", "--tgt", "mnistm-scenes-mini",
                "--device", "cpu", "--batch-size", "2", "--steps", "3", "--eval-every", "0", "--workers", "1",
                "--out", str(root / "seg"), "--log-format", "json"],
    }


@dataclass
class Launch:
    root: Path
    returncode: int
    stdout: str
    stderr: str
    names: list[str]

    def status(self, name: str) -> dict[int, int]:
        """{rank: exit status} of one command."""
        i = self.names.index(name)
        found = (re.fullmatch(rf"status {i} (-?\d+) rank (\d+)", line.strip()) for line in self.stderr.splitlines())
        return {int(m.group(2)): int(m.group(1)) for m in found if m}

    @property
    def log(self) -> str:
        return f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr[-6000:]}"


_LAUNCH: Launch | None = None


def shared_launch(tmp_path_factory) -> Launch:
    global _LAUNCH
    if _LAUNCH is None:
        root = tmp_path_factory.mktemp("cluster")
        cmds = commands(root)
        argv = []
        for name, cmd in cmds.items():
            argv += (["::"] if argv else []) + cmd
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath()}
        env.pop("UDA_LOG_FORMAT", None)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(ENTRY), *argv], capture_output=True, text=True, env=env, cwd=root, timeout=240)
        _LAUNCH = Launch(root, r.returncode, r.stdout, r.stderr, list(cmds))
    return _LAUNCH
