"""The run file: what ``masksam-core train`` saves (a run checkpoint) and ``masksam-core export`` writes
(a model file), as typed dataclasses over the dict that ``torch.save`` stores.

The dict on disk is unchanged by reading it into a :class:`RunFile`: ``RunFile.from_dict(d).to_dict()``
equals ``d`` with its keys in the same order, so files written before these classes existed load as
they are, and files written through them read the same with older versions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT = 1
"""The newest file layout this version reads and writes."""

RUN_KIND = "masksam-run"
"""``kind`` of a run checkpoint: everything needed to resume training or to predict."""
MODEL_KIND = "masksam-model"
"""``kind`` of a model file: a run's trainable weights, plans and class names, no training state."""

ORDER = ("kind", "format", "model", "build", "base_weights", "sam", "plans", "class_names", "summary", "optimizer",
         "scheduler", "scaler", "rng", "rng_ranks", "epoch", "iteration", "partial", "best", "history", "config")
"""Every key of a run file, in the order the writers lay them out."""

RUN_KEYS = tuple(k for k in ORDER if k != "summary")
MODEL_KEYS = ORDER[:ORDER.index("summary") + 1]
_REQUIRED = ("kind", "model", "build", "plans", "class_names")


@dataclass
class BuildSpec:
    """The arguments that rebuild a run's network with ``build_model`` (the file's ``build``)."""

    preset: str
    overrides: dict[str, Any]
    num_classes: int
    in_channels: int
    prompt_mode: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuildSpec:
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``build_model(self.preset, ...)`` besides its weights."""
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "prompt_mode": self.prompt_mode,
                **self.overrides}


@dataclass
class RunFile:
    """A run checkpoint (``kind`` :data:`RUN_KIND`) or model file (:data:`MODEL_KIND`).

    Both hold ``model`` (the trainable state, never SAM's weights), ``build``, ``base_weights`` (name
    and sha256 of the frozen base weights it was trained on; a run also keeps their path), ``sam`` (the
    frozen base weights only when they are random, as for ``tiny``, else None), ``plans`` (the
    preprocessing plans) and ``class_names``. A model file adds ``summary`` (epochs trained, the best
    validation score and the per-class Dice of the best epoch, the training settings). A run adds the
    training state: ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (rank 0's RNG state) and
    ``rng_ranks`` (every rank's, rank order), ``epoch`` (epochs finished), ``iteration`` (iterations
    finished in the current epoch), ``partial`` (loss sums, iterations and seconds of that unfinished
    epoch), ``best`` (best validation score so far), ``history`` (the metrics of every finished
    epoch) and ``config`` (the training settings). Fields a file lacks are None.
    """

    kind: str
    format: int
    model: dict[str, torch.Tensor]
    build: BuildSpec
    plans: dict[str, Any]
    class_names: list[str]
    base_weights: dict[str, Any] | None = None
    sam: dict[str, torch.Tensor] | None = None
    summary: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    rng_ranks: list[dict[str, Any]] | None = None
    epoch: int | None = None
    iteration: int | None = None
    partial: dict[str, Any] | None = None
    best: float | None = None
    history: list[dict[str, Any]] | None = None
    config: dict[str, Any] | None = None
    layout: tuple[str, ...] = field(default=(), repr=False, compare=False)
    """The keys of the dict it was read from, in their order (empty: a new file, laid out as its kind)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Keys this version does not know, kept so that they are written back."""

    @property
    def is_model_file(self) -> bool:
        return self.kind == MODEL_KIND

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunFile:
        """The typed view of a saved dict; raises KeyError or TypeError when a required key is missing
        or ``build`` does not have the expected keys."""
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise KeyError(", ".join(missing))
        known = {k: d[k] for k in ORDER if k in d}
        known["format"] = d.get("format", 0)
        known["build"] = BuildSpec.from_dict(d["build"])
        return cls(**known, layout=tuple(d), extra={k: v for k, v in d.items() if k not in ORDER})

    def to_dict(self) -> dict[str, Any]:
        """The dict to save: the keys it was read with (in their order), else those of its kind, and any
        other field that is set."""
        kind_keys = MODEL_KEYS if self.is_model_file else RUN_KEYS
        names = list(self.layout or kind_keys) + [k for k in self.extra if k not in self.layout]
        names += [k for k in ORDER if k not in names and getattr(self, k) is not None]
        out: dict[str, Any] = {}
        for name in names:
            if name not in ORDER:
                out[name] = self.extra[name]
            elif name == "build":
                out[name] = self.build.to_dict()
            else:
                out[name] = getattr(self, name)
        return out
