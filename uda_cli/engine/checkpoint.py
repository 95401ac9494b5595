"""Checkpoints: safetensors only, never pickle.

A checkpoint at step N is two files in ``<run>/checkpoints/``:

- ``step-0000000N.safetensors``: the weights of every network group (``"<group>.<param>"``)
  and the method's extra tensors (``"extra.<name>"``), with string metadata: ``format``,
  ``method``, ``config`` (the resolved method config as JSON), ``spec`` (task, classes,
  channels, image size), ``options`` (the run's options), ``step`` and ``uda_version``.
  This file alone is enough for ``evaluate``, ``tsne`` and ``adapt-images``.
- ``step-0000000N.state.safetensors``: what resuming needs beyond the weights: optimizer
  and lr-schedule state, the batch streams' positions, and the python/numpy/torch RNG
  states. Tensors are stored as tensors; the rest (param groups, scalars) as JSON metadata.
  A run on several processes stores every rank's RNG state (``rng_ranks``, gathered by
  rank 0, which alone writes checkpoints) beside rank 0's (``rng``); the weights, optimizer
  and stream states are the same on every rank.

Each file is written to a temporary name, fsynced and renamed, and only then does the
``latest`` pointer (a one-line text file, also replaced atomically) name the new step: a
run killed at any moment keeps its last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from uda_cli import __version__
from uda_cli.errors import CheckpointError, os_errors

FORMAT = "uda-checkpoint/1"
_STEP_RE = re.compile(r"^step-(\d{8})\.safetensors$")


# ---- atomic file writes -----------------------------------------------------------------

WRITE_ADVICE = "check that the folder is writable and has space"


def make_folder(path: Path, what: str = "the folder", advice: str = WRITE_ADVICE) -> Path:
    """``mkdir -p`` whose failure (a file in the way, no permission, no space) is one line of
    OutputError: ``could not create WHAT PATH: why; ADVICE``."""
    with os_errors(f"create {what}", path, advice):
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``path`` whole or not at all (a temporary file, then a rename): readers see the
    old file or the new one. ``durable`` also fsyncs the file and its folder, so that a power
    cut keeps it (checkpoints); an export of many small files skips that. A failure (a full
    disk, say) leaves the file as it was, removes the temporary one and is one OutputError line."""
    make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with os_errors("write", path, WRITE_ADVICE):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    # A fresh contiguous CPU tensor: safetensors refuses views that share storage.
    return t.detach().to("cpu", copy=True).contiguous()


# ---- weights -------------------------------------------------------------------------------

def weight_tensors(method) -> dict[str, torch.Tensor]:
    out = {f"{group}.{k}": _cpu(v) for group, net in method.nets.items() for k, v in net.state_dict().items()}
    out.update({f"extra.{k}": _cpu(v) for k, v in method.extra_state().items()})
    return out


def load_weights_into(method, tensors: dict[str, torch.Tensor], source: Path) -> None:
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in method.nets}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        group, _, rest = key.partition(".")
        if group == "extra":
            extra[rest] = t
        elif group in groups:
            groups[group][rest] = t
        else:
            raise CheckpointError(f"{source} has weights for an unknown network {group!r}; it does not match this method")
    for group, sd in groups.items():
        try:
            method.nets[group].load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else "shape mismatch"
            raise CheckpointError(f"{source}: weights of {group!r} do not fit the network ({first})") from None
    method.load_extra_state(extra)


# ---- optimizer / scheduler / RNG state ----------------------------------------------------

def _split_state(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference and collect it in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = _cpu(obj)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _split_state(f"{prefix}/{k}", v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_split_state(f"{prefix}/{i}", v, tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def _join_state(obj: Any, tensors: dict[str, torch.Tensor] | None) -> Any:
    """``_split_state`` undone; with ``tensors`` None every tensor reads None (the layout alone)."""
    if isinstance(obj, dict) and "__tensor__" in obj:
        return None if tensors is None else tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _join_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict[str, Any]) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"][: torch.cuda.device_count()])


def pack_state(obj: Any) -> bytes:
    """A nested state (dicts, lists, tensors, scalars) as safetensors bytes, to send between ranks."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_state("s", obj, tensors)
    return st_save(tensors, metadata={"format": FORMAT, "state": json.dumps(structure)})


def unpack_state(data: bytes) -> Any:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    return _join_state(json.loads(meta["state"]), st_load(data))


# ---- save / load -----------------------------------------------------------------------------

def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(ckpt_dir: Path, step: int, method, meta: dict[str, Any], train_state: dict[str, Any],
                    keep: int = 3) -> Path:
    """Write weights + training state for ``step``, then move ``latest`` to it; prune old ones."""
    name = step_name(step)
    state_tensors: dict[str, torch.Tensor] = {}
    structure = _split_state("s", train_state, state_tensors)
    atomic_write_bytes(ckpt_dir / f"{name}.state.safetensors",
                       st_save(state_tensors, metadata={"format": FORMAT, "state": json.dumps(structure)}))
    metadata = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    metadata.update(format=FORMAT, step=str(step), uda_version=__version__)
    weights = ckpt_dir / f"{name}.safetensors"
    atomic_write_bytes(weights, st_save(weight_tensors(method), metadata=metadata))
    atomic_write_bytes(ckpt_dir / "latest", (name + "\n").encode())
    _prune(ckpt_dir, keep, current=step)
    return weights


def kept_steps(ckpt_dir: Path) -> list[int]:
    """The steps of the checkpoints in ``ckpt_dir`` (a run's ``checkpoints/``), ascending."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _STEP_RE.match(p.name)))


def _prune(ckpt_dir: Path, keep: int, current: int) -> None:
    steps = kept_steps(ckpt_dir)
    for s in steps[:-keep] if keep > 0 else []:
        if s == current:
            continue
        for suffix in (".safetensors", ".state.safetensors"):
            (ckpt_dir / f"{step_name(s)}{suffix}").unlink(missing_ok=True)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` already holds a run: its ``checkpoints/latest`` pointer exists."""
    return (Path(run_dir) / "checkpoints" / "latest").exists()


def resolve_checkpoint(path: Path) -> Path:
    """A run folder, its ``checkpoints/`` folder, or a weights file -> the weights file."""
    path = Path(path)
    if path.is_dir():
        ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        pointer = ckpt_dir / "latest"
        if not pointer.is_file():
            raise CheckpointError(f"no checkpoint in {path} (no checkpoints/latest); train first or pass a .safetensors file")
        weights = ckpt_dir / f"{pointer.read_text().strip()}.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{pointer} names {weights.name}, which is missing; pass an existing checkpoint file")
        return weights
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.name.endswith(".state.safetensors"):
        return path.with_name(path.name[: -len(".state.safetensors")] + ".safetensors")
    return path


def read_metadata(weights: Path) -> dict[str, Any]:
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is truncated or not a safetensors file ({_short(e)}); use another checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{weights} is not a uda checkpoint (no {FORMAT!r} metadata); pass one written by `uda train`")
    out: dict[str, Any] = dict(meta)
    for k in ("config", "spec", "options"):
        if k in out:
            out[k] = json.loads(out[k])
    out["step"] = int(out["step"])
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({_short(e)}); use another checkpoint") from None


def read_train_state(weights: Path, tensors: bool = True) -> dict[str, Any]:
    """The training state saved beside ``weights``. With ``tensors=False`` only the file's header
    is read and every tensor in the state is None: what a reader of settings (an optimizer's
    param_groups, the step) needs, without loading the optimizer moments."""
    state_path = weights.with_name(weights.name[: -len(".safetensors")] + ".state.safetensors")
    if not state_path.is_file():
        raise CheckpointError(f"{state_path.name} is missing beside {weights.name}: this checkpoint can be evaluated but not resumed")
    try:
        with safe_open(str(state_path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{state_path} is truncated or corrupt ({_short(e)}); resume from an earlier checkpoint") from None
    if meta.get("format") != FORMAT or "state" not in meta:
        raise CheckpointError(f"{state_path} is not a uda training state")
    return _join_state(json.loads(meta["state"]), read_tensors(state_path) if tensors else None)


def _short(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]
