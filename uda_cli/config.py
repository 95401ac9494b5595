"""Validated options for every command.

Each command parses its flags with Typer and validates them here with pydantic
(``extra="forbid"``: an unknown field in a config file is an error, never ignored).
``train --config run.toml`` reads the same fields; flags given on the command line win over
the file; method hyperparameters come from the file's ``[params]`` table and ``--set
name=value`` and are validated by the method's own ``Config`` class.

No torch here: ``uda --help`` must stay instant.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from uda_cli.errors import ConfigError, did_you_mean

# The forward passes' precision (uda_cli.engine.runtime.autocast_for); the CLI's choices and
# benchmarks/digits.py's are read from here.
Precision = Literal["auto", "fp32", "bf16"]

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=True)


def _check_device(v: str) -> str:
    if not _DEVICE_RE.match(v):
        raise ValueError("must be auto, cpu, cuda or cuda:N")
    return v


def _check_domain(v: str) -> str:
    from uda_cli.data.registry import get_domain, parse_domain

    name, _split = parse_domain(v)
    try:
        get_domain(name)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return v


def _check_size(v: str | None) -> str | None:
    """A ``WxH`` option (``parse_size`` says what is wrong in one line)."""
    if v is not None:
        parse_size(v)
    return v


def _existing_target(v: Path) -> Path:
    if not v.exists():
        raise ValueError(f"{v} does not exist; pass a run folder (runs/NAME) or a .safetensors checkpoint")
    return v


class TrainOptions(Options):
    method: str = Field(description="method name, e.g. source-only, dann")
    src: str = Field(description="labelled source domain, e.g. mnist2000 or mnist:train")
    tgt: str = Field(description="unlabelled target domain, e.g. usps1800")
    steps: int | None = Field(default=None, gt=0, description="training steps (default: the method's)")
    batch_size: int | None = Field(default=None, gt=0, description="images per domain per step (default: the method's)")
    seed: int = Field(default=0, ge=0)
    out: Path | None = Field(default=None, description="run folder (default: runs/<method>_<src>_<tgt>_s<seed>)")
    data_root: Path | None = None
    device: str = "auto"
    precision: Precision | None = Field(
        default=None, description="auto: bf16 autocast on CUDA, float32 on the CPU; fp32: no autocast; bf16: autocast "
                                  "on either; default: a resumed run's own, else auto")
    save_every: int = Field(default=1000, gt=0)
    eval_every: int = Field(default=1000, ge=0, description="0 turns periodic evaluation off")
    log_every: int = Field(default=50, gt=0)
    keep_checkpoints: int = Field(default=3, ge=0, description="periodic checkpoints kept (the latest always is); 0 keeps every one")
    log_format: Literal["auto", "text", "json"] = Field(
        default="auto", description="auto: a progress bar on a terminal, text elsewhere; json: one object per line"
    )
    resume: str | None = Field(default=None, description="'auto' or a checkpoint path")
    params: dict[str, Any] = Field(default_factory=dict, description="method hyperparameters")
    init: Path | None = Field(default=None, description="start from another run's (or checkpoint's) network: "
                                                         "a run folder or a .safetensors checkpoint")
    # Segmentation only (dense domains): sizes are written WxH, as the papers write them.
    src_size: str | None = Field(default=None, description="WxH the source images are resized to (default: the domain's)")
    tgt_size: str | None = Field(default=None, description="WxH the target images are resized to (default: the domain's)")
    crop: str | None = Field(default=None, description="WxH random training crop, after --scale (default: none)")
    scale: str | None = Field(default=None, description="LO,HI random scale before the crop, e.g. 0.5,1.5 (default: none)")
    flip: bool = Field(default=False, description="random horizontal flips of training images")
    workers: int | None = Field(default=None, ge=0, description="data loader workers per domain (default: up to 4, "
                                                                "one less than the CPUs)")

    _device = field_validator("device")(_check_device)
    _domains = field_validator("src", "tgt")(_check_domain)

    @field_validator("init")
    @classmethod
    def _init(cls, v: Path | None) -> Path | None:
        if v is not None and not v.exists():
            raise ValueError(f"{v} does not exist; pass a run folder (runs/NAME) or a .safetensors checkpoint")
        return v

    _size = field_validator("src_size", "tgt_size", "crop")(_check_size)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: str | None) -> str | None:
        if v is not None:
            parse_scale(v)
        return v

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from uda_cli.methods.registry import get_method

        try:
            get_method(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return v
        if not Path(v).exists():
            raise ValueError(f"no checkpoint at {v}; pass 'auto' or an existing checkpoint file or run folder")
        return v

    def run_dir(self) -> Path:
        if self.out is not None:
            return self.out
        clean = lambda s: re.sub(r"[^A-Za-z0-9.-]+", "-", s)  # noqa: E731
        return Path("runs") / f"{clean(self.method)}_{clean(self.src)}_{clean(self.tgt)}_s{self.seed}"


_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` (W x H, as the papers write sizes) -> ``(720, 1280)`` (H, W, as tensors are)."""
    m = _SIZE_RE.match(text)
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise ValueError(f"{text!r} is not a size; write WIDTHxHEIGHT, e.g. 1024x512")
    return int(m[2]), int(m[1])


def parse_scale(text: str) -> tuple[float, float]:
    """``"0.5,1.5"`` -> ``(0.5, 1.5)``: the range of a random scale, 0 < LO <= HI."""
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a scale range; write LO,HI, e.g. 0.5,1.5") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{text!r}: a scale range needs 0 < LO <= HI, e.g. 0.5,1.5")
    return lo, hi


def parse_scales(text: str) -> tuple[float, ...]:
    """``"0.75,1,1.25"`` -> ``(0.75, 1.0, 1.25)``: the scales of multi-scale testing, each > 0."""
    try:
        scales = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a list of scales; write e.g. 0.75,1,1.25") from None
    if not scales or any(x <= 0 for x in scales):
        raise ValueError(f"{text!r}: scales are positive numbers, e.g. 0.75,1,1.25")
    return scales


class EvaluateOptions(Options):
    target: Path = Field(description="a run folder or a checkpoint file")
    domain: str | None = Field(default=None, description="NAME[:split]; default: the run's target test split")
    json_path: Path | None = None
    data_root: Path | None = None
    device: str = "auto"
    precision: Precision | None = Field(default=None, description="default: the precision the run trained in")
    batch_size: int | None = Field(default=None, gt=0, description="images per batch (default: 512 for classification; "
                                                                     "segmentation: about a megapixel a batch)")
    # Segmentation only.
    size: str | None = Field(default=None, description="WxH images are resized to before the network (default: "
                                                       "the run's target size)")
    flip: bool = Field(default=False, description="average with the horizontally flipped prediction")
    scales: str | None = Field(default=None, description="multi-scale testing, e.g. 0.75,1,1.25 (default: 1)")
    save_predictions: Path | None = Field(default=None, description="write per-image label-id PNGs and colour previews here")
    workers: int | None = Field(default=None, ge=0, description="data loader workers (default: up to 4)")

    _device = field_validator("device")(_check_device)

    _size = field_validator("size")(_check_size)

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: str | None) -> str | None:
        if v is not None:
            parse_scales(v)
        return v

    @field_validator("save_predictions")
    @classmethod
    def _save_dir(cls, v: Path | None) -> Path | None:
        if v is not None and v.exists() and not v.is_dir():
            raise ValueError(f"{v} is a file; pass a folder for the predictions")
        return v

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        return None if v is None else _check_domain(v)

    _target = field_validator("target")(_existing_target)

    @field_validator("json_path")
    @classmethod
    def _json_file(cls, v: Path | None) -> Path | None:
        if v is not None and v.is_dir():
            raise ValueError(f"{v} is a folder; pass a file path, e.g. {v / 'report.json'}")
        return v


class DownloadOptions(Options):
    # list_only and verify come first: the datasets check reads them (pydantic validates in order).
    list_only: bool = Field(default=False, description="show every dataset, its size, licence and status; fetch nothing")
    verify: bool = Field(default=False, description="audit the copy under the data root; fetch nothing")
    datasets: list[str] = Field(
        default_factory=list, validate_default=True, description="dataset names, e.g. mnist usps"
    )
    data_root: Path | None = None
    mirrors: list[str] = Field(default_factory=list, description="base URLs or folders tried before the official URLs")
    force: bool = False
    include_optional: bool = True

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, v: list[str], info) -> list[str]:  # info: pydantic ValidationInfo
        from uda_cli.data.download import get_dataset, list_datasets

        if not v and not info.data.get("list_only"):
            raise ValueError(f"name at least one dataset: {', '.join(list_datasets())}")
        for name in v:
            try:
                get_dataset(name)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return list(dict.fromkeys(v))  # `uda download mnist mnist` fetches once

    @field_validator("mirrors")
    @classmethod
    def _mirrors(cls, v: list[str]) -> list[str]:
        for m in v:
            if "://" in m:
                scheme = m.split("://", 1)[0].lower()
                if scheme not in ("http", "https", "file"):
                    raise ValueError(f"{m}: a mirror is an http(s):// or file:// URL, or a folder")
            elif not Path(m).expanduser().is_dir():
                raise ValueError(f"{m} is not a folder; a mirror is an http(s):// or file:// URL, or a folder")
        return v

    @field_validator("verify")
    @classmethod
    def _one_mode(cls, v: bool, info) -> bool:
        if v and info.data.get("list_only"):
            raise ValueError("--list and --verify do different things; pass one of them")
        return v

    @field_validator("force")
    @classmethod
    def _force(cls, v: bool, info) -> bool:
        if v and (info.data.get("list_only") or info.data.get("verify")):
            raise ValueError("--list and --verify fetch nothing; drop --force")
        return v


class AdaptImagesOptions(Options):
    target: Path = Field(description="a run folder or checkpoint of a method that translates images")
    out: Path = Field(description="the export folder; `--src folder:OUT` reads it back")
    domain: str | None = Field(default=None, description="NAME[:split] to translate; default: the run's source split")
    samples_per_image: int = Field(default=1, gt=0, description="translations per source image (methods with a noise input)")
    limit: int | None = Field(default=None, gt=0, description="translate only the first N images of the split")
    seed: int = Field(default=0, ge=0, description="seeds the noise: sample k of image i is the same on every call")
    batch_size: int | None = Field(default=None, gt=0, description="images per batch (default: 256 for "
                                   "classification; segmentation: about a megapixel at the export size)")
    # Segmentation runs only (a classification run refuses them in one line).
    size: str | None = Field(default=None, description="WxH the scenes are translated and written at (default: "
                                                       "the size the run read that domain at)")
    workers: int | None = Field(default=None, ge=0, description="data loader workers (default: up to 4)")
    data_root: Path | None = None
    device: str = "auto"

    _device = field_validator("device")(_check_device)
    _target = field_validator("target")(_existing_target)

    _size = field_validator("size")(_check_size)

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        return None if v is None else _check_domain(v)

    @field_validator("out")
    @classmethod
    def _out(cls, v: Path) -> Path:
        if v.exists() and not v.is_dir():
            raise ValueError(f"{v} is a file; pass a new or empty folder, or an earlier export to finish it")
        return v


class TsneOptions(Options):
    target: Path = Field(description="a run folder or a checkpoint file")
    src: str | None = Field(default=None, description="NAME[:split]; default: the run's source, its evaluation split")
    tgt: str | None = Field(default=None, description="NAME[:split]; default: the run's target evaluation split "
                            "(--easy-hard: its training split)")
    out: Path | None = Field(default=None, description="output folder; default: <run>/tsne")
    samples: int = Field(default=1000, gt=0,
                         description="up to this many images (segmentation: pixels) per domain, class-balanced")
    perplexity: float = Field(default=30.0, gt=0)
    seed: int = Field(default=0, ge=0, description="seeds the draw, the embedding and the domain classifier")
    batch_size: int | None = Field(default=None, gt=0, description="images per batch (default: 512; segmentation: "
                                   "about a megapixel at the run's size)")
    # Segmentation runs only (a classification run refuses them in one line).
    max_images: int | None = Field(default=None, gt=0, description="segmentation: read at most this many images "
                                   "per domain (default: 100)")
    workers: int | None = Field(default=None, ge=0, description="segmentation: data loader workers (default: up to 4)")
    easy_hard: bool = Field(default=False, description="tpld runs: colour target pixels by their image's easy/hard "
                            "split in the last phase-2 round (target images from its training split)")
    data_root: Path | None = None
    device: str = "auto"

    _device = field_validator("device")(_check_device)
    _target = field_validator("target")(_existing_target)

    @field_validator("src", "tgt")
    @classmethod
    def _domains(cls, v: str | None) -> str | None:
        return None if v is None else _check_domain(v)

    @field_validator("out")
    @classmethod
    def _out(cls, v: Path | None) -> Path | None:
        if v is not None and v.exists() and not v.is_dir():
            raise ValueError(f"{v} is a file; pass a folder")
        return v


# --------------------------------------------------------------------------------------
# Option parsing helpers shared by the commands
# --------------------------------------------------------------------------------------


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["lr=1e-3", "betas=[0.5,0.9]"]`` -> ``{"lr": 0.001, "betas": [0.5, 0.9]}``.

    Values are read as JSON where they parse (numbers, booleans, lists), else as strings.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--set: expected name=value, got {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no file at {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path} is not valid TOML: {e}") from None


# Field names as the user types them.
OPTION_NAMES = {"json_path": "--json", "target": "RUN_OR_CHECKPOINT", "datasets": "DATASETS", "params": "--set"}


def option_name(field: str) -> str:
    return OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def validation_lines(e: ValidationError, prefix: str | None = None) -> list[str]:
    """One ``<option>: <problem>`` line per pydantic error."""
    return [_option_line(err, prefix) for err in e.errors()]


def _option_line(err: Any, prefix: str | None = None) -> str:
    loc = [str(p) for p in err["loc"]]
    if prefix is not None:
        name = f"{prefix} {'.'.join(loc)}".strip()
    else:
        name = option_name(loc[0]) if loc else "options"
        if len(loc) > 1:
            name += "." + ".".join(loc[1:])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown option" if prefix is None else "unknown hyperparameter for this method"
    return f"{name}: {msg}"


def method_config(method: str, params: dict[str, Any], source: str = "--set", files: dict[str, str] | None = None):
    """Validate hyperparameters with the method's own ``Config`` (unknown names rejected).

    A problem is named after where the value came from: ``source`` (``--set lr: ...``), or for
    a name in ``files`` (name -> the config file that set it) that file's ``[params]`` table
    (``run.toml: [params] field 'lr': ...``). An unknown name gets the closest known one."""
    from uda_cli.methods.registry import get_method

    cls = get_method(method)
    try:
        return cls.Config(**params)
    except ValidationError as e:
        known = sorted(cls.Config.model_fields)
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            file = (files or {}).get(loc[0]) if loc else None
            if err["type"] == "extra_forbidden":
                hint = did_you_mean(loc[0], known)
                lines.append(f"{file}: [params] field {loc[0]!r} is unknown to {method}{hint}" if file else
                             f"{source} {loc[0]}: unknown hyperparameter of {method}{hint}")
                continue
            msg = err["msg"].removeprefix("Value error, ")
            if file:
                lines.append(f"{file}: [params] field {'.'.join(loc)!r}: {msg}")
            elif loc:
                lines.append(f"{source} {'.'.join(loc)}: {msg}")
            else:  # the Config's own check of several fields: name the file when only it set them
                only_file = files and set(params) <= set(files)
                lines.append(f"{next(iter(files.values()))}: [params]: {msg}" if only_file else f"{source}: {msg}")
        raise ConfigError("\n".join(lines + [f"{method} hyperparameters: {', '.join(known)}"])) from None


def _file_line(err: Any, file: str, written: dict[str, str]) -> str:
    """The line for an error in a field a config file set (``written``: field -> the key as the
    file spells it): ``run.toml: field 'stpes' is unknown (did you mean 'steps'?)``."""
    loc = [str(p) for p in err["loc"]]
    key = written.get(loc[0], loc[0])
    if err["type"] == "extra_forbidden":
        fields = [f for f in TrainOptions.model_fields if f != "params"]
        if "_" not in key:  # suggest in the file's own spelling: batch-size where keys are dashed
            fields = [f.replace("_", "-") for f in fields]
        return f"{file}: field {key!r} is unknown{did_you_mean(key, fields)}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{file}: field {'.'.join([key, *loc[1:]])!r}: {msg}"


def merge_train_options(config: Path | None, flags: dict[str, Any], sets: dict[str, Any]) -> TrainOptions:
    """File values, overridden by the flags that were given, then ``--set`` on top of ``[params]``.

    Every problem is reported at once, the method's hyperparameters included, each named after
    where its value came from: the flag, ``--set NAME``, or the config file and its field.
    """
    raw: dict[str, Any] = read_toml(config) if config else {}
    written = {k.replace("-", "_"): k for k in raw}  # field -> the key as the file spells it
    data = {k.replace("-", "_"): v for k, v in raw.items()}
    from_file = set(data)
    for k, v in flags.items():
        if v is not None:
            data[k] = v
            from_file.discard(k)
    lines: list[str] = []
    file_params = data.get("params", {})
    if not isinstance(file_params, dict):
        lines.append(f"{config}: field {written.get('params', 'params')!r} must be a table: a [params] section "
                     "of name = value lines")
        file_params = {}
    params = {**file_params, **sets}
    data["params"] = params
    opts = None
    try:
        opts = TrainOptions.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            in_file = bool(err["loc"]) and str(err["loc"][0]) in from_file
            lines.append(_file_line(err, str(config), written) if in_file else _option_line(err))
    method = data.get("method")
    if isinstance(method, str) and not any(l.startswith("--method:") or "field 'method'" in l for l in lines):
        files = {name: str(config) for name in params if name not in sets} if config else None
        try:
            method_config(method, params, files=files)
        except ConfigError as e:
            lines += str(e).splitlines()
    if lines:
        raise ConfigError("\n".join(lines))
    return opts
