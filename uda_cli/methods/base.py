"""The method API: what a domain-adaptation method tells the one training loop.

A method says which networks it has (``build``), what one step's losses are
(``train_step``), how to predict (``predict``) and embed (``features``) an image, and, for
translators, how to ``translate`` one. Everything else (devices, precision, optimizers,
schedules, logging, checkpoints, distribution) belongs to the engine. A step updates a
network group by calling ``self.update(name, loss)``, which the engine binds to
zero-grad / backward / clip / step of that group's optimizer.

Self-training methods (a later issue) override ``round_starts`` and ``prepare_round`` for
their pseudo-label pass; segmentation methods return per-pixel logits ``[B, K, H, W]``
from ``predict``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from uda_cli.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn


class MethodConfig(BaseModel):
    """Hyperparameters shared by every method; each method's ``Config`` extends it.

    Defaults in a subclass are the paper's values; the docstring of the method says where
    it departs from them and why.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    steps: int = Field(10_000, gt=0, description="training steps when --steps is not given")
    batch_size: int = Field(128, gt=0, description="images per domain per step when --batch-size is not given")
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(2e-4, gt=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.5, 0.999)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "step", "inv", "poly"] = Field(
        "constant",
        description="step: lr*gamma^(step//lr_step_every); inv: lr*(1+10p)^-0.75 (DANN); poly: lr*(1-p)^0.9",
    )
    lr_step_every: int = Field(20_000, gt=0)
    lr_gamma: float = Field(0.95, gt=0)
    grad_clip: float | None = Field(None, gt=0, description="clip each group's gradient norm to this")

    @field_validator("*", mode="after")
    @classmethod
    def _shared_constraints(cls, v: Any, info: ValidationInfo) -> Any:
        """A method's Config re-declares a shared field to give it the paper's default
        (``lr: float = 1e-3``), and in pydantic that drops the constraints declared here
        (lr > 0, betas in [0, 1)); so every method's value is checked against them again."""
        check = _shared_checks().get(info.field_name)
        if check is None or cls is MethodConfig:
            return v
        try:
            return check.validate_python(v)
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"]) from None


@cache
def _shared_checks() -> dict[str, TypeAdapter]:
    """MethodConfig's own type and constraints of each of its fields, as a validator."""
    return {name: TypeAdapter(Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation)
            for name, f in MethodConfig.model_fields.items()}


@dataclass(frozen=True)
class OptimSpec:
    """One optimizer over some network groups. ``lr_mult`` scales the lr of single nets."""

    nets: tuple[str, ...]
    kind: Literal["adam", "sgd"] = "adam"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Literal["constant", "step", "inv", "poly"] = "constant"
    step_every: int = 20_000
    gamma: float = 0.95
    grad_clip: float | None = None
    lr_mult: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: MethodConfig, nets: tuple[str, ...], **overrides: Any) -> "OptimSpec":
        base = dict(
            kind=cfg.optimizer, lr=cfg.lr, betas=tuple(cfg.betas), momentum=cfg.momentum,
            weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule, step_every=cfg.lr_step_every,
            gamma=cfg.lr_gamma, grad_clip=cfg.grad_clip,
        )
        base.update(overrides)
        return cls(nets=tuple(nets), **base)


@dataclass(frozen=True)
class RunSpec:
    """What a method's networks depend on; stored in every checkpoint to rebuild them."""

    task: str
    classes: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]
    domains: tuple[str, ...] = ()  # (source, target) names, for choices such as a backbone
    # Segmentation: named subsets of the classes (train ids) reported besides all of them
    # (SYNTHIA's "16" and "13" of the Cityscapes 19).
    class_subsets: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["image_size"] = list(self.image_size)
        d["domains"] = list(self.domains)
        d["class_subsets"] = [[n, list(ids)] for n, ids in self.class_subsets]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RunSpec":
        return cls(task=d["task"], classes=tuple(d["classes"]), channels=int(d["channels"]),
                   image_size=tuple(d["image_size"]), domains=tuple(d.get("domains", ())),
                   class_subsets=tuple((n, tuple(ids)) for n, ids in d.get("class_subsets", ())))


@dataclass
class RoundContext:
    """What ``prepare_round`` gets: the run folder, the target training data, and helpers.

    ``resumed``: the run resumed inside this round, whose files are complete: reload them
    (and call ``set_target`` again), never predict again. ``set_target(source)`` makes the
    target batches come from ``source`` from here on (a dense source whose labels are the
    round's pseudo-labels; ``batch["y_t"]`` then holds them and ``idx_t`` indexes ``source``),
    resized and augmented as the run's target is, in an order of its own seeded by the round.
    """

    run_dir: Path
    round_index: int
    step: int
    resumed: bool
    target: Any  # the target training domain (an in-memory or streaming domain)
    device: Any
    autocast: Callable[[], Any]
    dist: Any = None  # engine.distributed.Dist: the pass shards over its ranks
    size: tuple[int, int] | None = None  # (H, W) the target trains at
    seed: int = 0
    num_workers: int = 0
    set_target: Callable[..., None] | None = None  # (source, name="tgt"), bound to this round
    info: Callable[[str], None] = print  # one log line


class Method:
    """Base class of every method. Subclasses set ``Config``, ``tasks`` and implement ``build``,
    ``train_step``, ``predict`` and ``features``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    tasks: ClassVar[set[str]] = {"classification"}
    translates_images: ClassVar[bool] = False
    has_noise_input: ClassVar[bool] = False  # translate() takes noise from sample_noise (PixelDA's z)

    def __init__(self, config: MethodConfig, spec: RunSpec):
        from torch import nn

        self.cfg = config
        self.spec = spec
        self.nets: nn.ModuleDict = nn.ModuleDict(self.build())
        self._update: Callable[[str, "torch.Tensor"], None] | None = None
        self.total_steps: int = config.steps  # the engine sets the run's real total before training

    # ---- what a method implements ------------------------------------------------------
    @classmethod
    def task_defaults(cls, task: str, domains: tuple[str, ...]) -> dict[str, Any]:
        """Hyperparameters that differ by task (a DeepLab recipe for segmentation, a digits one
        for classification); the user's ``--set`` and ``[params]`` win over them."""
        return {}

    @classmethod
    def input_channels(cls, config: MethodConfig, src_channels: int, tgt_channels: int) -> int:
        """Channels a run uses: colour if either domain is colour (grey is repeated), or one
        channel when the method's config has ``grayscale`` set (i2i, dtn: a colour domain is
        then loaded as luma)."""
        if getattr(config, "grayscale", False):
            return 1
        return max(src_channels, tgt_channels)

    @classmethod
    def derived_steps(cls, config: MethodConfig) -> int | None:
        """A run's length when the method derives it from its config (self-training: warm-up
        plus rounds x round steps); None: ``--steps`` or the config's ``steps``."""
        return None

    def build(self) -> dict[str, "nn.Module"]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, OptimSpec]:
        """Optimizer groups; by default one Adam/SGD over every network, from the config."""
        return {"main": OptimSpec.from_config(self.cfg, tuple(self.nets.keys()))}

    def train_step(self, batch: dict[str, "torch.Tensor"], step: int) -> dict[str, "torch.Tensor"]:
        raise NotImplementedError

    def predict(self, x: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError

    def features(self, x: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError

    def translate(self, x: "torch.Tensor", noise: "torch.Tensor | None" = None) -> "torch.Tensor":
        raise NotImplementedError(f"{self.name} does not translate images")

    def sample_noise(self, n: int, like: "torch.Tensor") -> "torch.Tensor":
        """``n`` noise inputs for ``translate`` on ``like``'s device, for methods with ``has_noise_input``."""
        raise NotImplementedError(f"{self.name} has no noise input")

    def round_starts(self, total_steps: int) -> list[int]:
        """Steps at which a self-training round begins (``prepare_round`` runs there)."""
        return []

    def prepare_round(self, ctx: RoundContext) -> None:
        """Pseudo-label pass before a round; on resume, reload what the round wrote."""

    def check_target(self, target) -> None:
        """Before the first step: refuse, in one line, a target the rounds could not use (a
        ``target_list`` naming images it lacks), rather than after a warm-up."""

    def extra_state(self) -> dict[str, "torch.Tensor"]:
        """Tensors outside the networks that a checkpoint must keep."""
        return {}

    def load_extra_state(self, state: dict[str, "torch.Tensor"]) -> None:
        if state:
            raise CheckpointError(f"{self.name}: the checkpoint holds extra state {sorted(state)} that {self.name} "
                                  f"does not write; pass a checkpoint of a {self.name} run")

    # ---- given by the engine -----------------------------------------------------------
    def update(self, name: "str | tuple[str, ...]", loss: "torch.Tensor") -> None:
        """Backpropagate ``loss`` and step optimizer group ``name`` (the engine's); a tuple of
        names steps each of those groups after one shared backward."""
        if self._update is None:
            raise RuntimeError("update() is only available inside the training loop")
        self._update(name, loss)

    def train(self, mode: bool = True) -> "Method":
        self.nets.train(mode)
        return self

    def eval(self) -> "Method":
        return self.train(False)
