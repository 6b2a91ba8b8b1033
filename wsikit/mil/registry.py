"""One registry of slide-level models: name → constructor with sensible defaults.

``build_model(name, in_dim, n_classes, **overrides)``; ``list_models()`` gives the names with one-line
descriptions. A checkpoint stores ``ModelSpec`` (name, in_dim, n_classes, kwargs) to rebuild the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from wsikit.mil.abmil import ABMIL
from wsikit.mil.base import MILModel
from wsikit.mil.clam import CLAM
from wsikit.mil.dsmil import DSMIL
from wsikit.mil.instance import InstanceMIL
from wsikit.mil.pooling import PoolMIL
from wsikit.mil.transmil import TransMIL


class ModelError(ValueError):
    """Unknown model name or bad model options."""


_MODELS: dict[str, tuple[Callable[..., MILModel], dict[str, Any], str]] = {
    "abmil": (ABMIL, {"gated": False}, "attention MIL, plain tanh attention (Ilse et al. 2018)"),
    "abmil-gated": (ABMIL, {"gated": True}, "attention MIL, gated attention (Ilse et al. 2018)"),
    "clam-sb": (CLAM, {"multi_branch": False}, "CLAM single attention branch + instance clustering"),
    "clam-mb": (CLAM, {"multi_branch": True}, "CLAM one attention branch per class + instance clustering"),
    "transmil": (TransMIL, {}, "TransMIL: class token, Nyström attention, PPEG position encoding"),
    "dsmil": (DSMIL, {}, "DSMIL: dual stream, critical-instance attention"),
    "mean-pool": (PoolMIL, {"pool": "mean"}, "baseline: mean of tile embeddings"),
    "max-pool": (PoolMIL, {"pool": "max"}, "baseline: element-wise max of tile embeddings"),
    "instance-mean": (
        InstanceMIL,
        {"aggregation": "mean"},
        "patch classifier, slide = mean of tile probabilities",
    ),
    "instance-max": (InstanceMIL, {"aggregation": "max"}, "patch classifier, slide = max of tile logits"),
    "instance-topk": (InstanceMIL, {"aggregation": "topk"}, "patch classifier, slide = mean of top-k logits"),
}


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: registry name, input dim, number of classes, options."""

    name: str
    in_dim: int
    n_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> MILModel:
        return build_model(self.name, self.in_dim, self.n_classes, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_models() -> dict[str, str]:
    """Model names with a one-line description each."""
    return {name: desc for name, (_, _, desc) in _MODELS.items()}


def build_model(name: str, in_dim: int, n_classes: int, **overrides: Any) -> MILModel:
    """A fresh model from the registry; ``overrides`` replace its default options (e.g. ``dropout=0.1``)."""
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}")
    if n_classes < 2:
        raise ModelError(f"n_classes={n_classes}: a classifier needs at least 2 classes")
    cls, defaults, _ = _MODELS[name]
    try:
        return cls(in_dim=in_dim, n_classes=n_classes, **{**defaults, **overrides})
    except TypeError as exc:
        raise ModelError(f"model {name!r}: bad option ({exc})") from exc
