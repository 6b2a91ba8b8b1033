"""Weights through timm's own pretrained tags and ``timm:hf-hub:<repo>`` models (their hub config).

Read from the local Hugging Face cache when present (identified as ``hf:<repo>@<revision>``);
otherwise downloaded by timm when the hub answers, or refused at once with instructions.
"""

from __future__ import annotations

import json

from torch import nn

from wsikit.encoders.archs import timm_kwargs
from wsikit.encoders.hub import cached_hub_file, hf_offline, hub_reachable, revision_of
from wsikit.encoders.spec import EncoderError, EncoderSpec
from wsikit.encoders.weights import WEIGHT_FILES, unavailable


def _from_hub_config(spec: EncoderSpec, repo: str) -> tuple[nn.Module, str] | None:
    import timm

    config_path = cached_hub_file(repo, ("config.json",), spec.revision)
    weights = cached_hub_file(repo, WEIGHT_FILES, spec.revision)
    if weights is None or config_path is None:
        return None
    config = json.loads(config_path.read_text())
    arch = config.get("architecture") or spec.arch
    kwargs = {**config.get("model_args", {}), **timm_kwargs(spec), "num_classes": 0}
    overlay = {**config.get("pretrained_cfg", {}), "file": str(weights)}
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return model, f"hf:{repo}@{revision_of(weights)}"


def _from_timm_tag(spec: EncoderSpec) -> tuple[nn.Module, str] | str:
    import timm

    model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **timm_kwargs(spec))
    repo = (model.pretrained_cfg or {}).get("hf_hub_id") or ""
    if not repo:
        raise EncoderError(
            f"{spec.name}: timm has no pretrained weights for {spec.arch}; pass --weights or --random-weights"
        )
    weights = cached_hub_file(repo, WEIGHT_FILES, spec.revision)
    if weights is None:
        return repo
    overlay = {"file": str(weights)}
    model = timm.create_model(
        spec.arch, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay, **timm_kwargs(spec)
    )
    return model, f"hf:{repo}@{revision_of(weights)}"


def build_timm_pretrained(spec: EncoderSpec) -> tuple[nn.Module, str]:
    """A timm model with its pretrained weights, from the cache or (online) downloaded by timm."""
    import timm

    if spec.arch.startswith(("hf-hub:", "hf_hub:")):
        repo = spec.hub_id or spec.arch.split(":", 1)[1]
        found = _from_hub_config(spec, repo)
        if found is not None:
            return found
        target = f"hf-hub:{repo}"
    else:
        tagged = _from_timm_tag(spec)
        if not isinstance(tagged, str):
            return tagged
        repo, target = tagged, spec.arch
    if hf_offline():
        raise unavailable(spec, repo, "HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise unavailable(spec, repo, "the hub cannot be reached (no internet?)")
    try:
        model = timm.create_model(target, pretrained=True, num_classes=0, **timm_kwargs(spec))
    except Exception as exc:
        raise unavailable(spec, repo, f"the download failed ({type(exc).__name__})") from exc
    weights = cached_hub_file(repo, WEIGHT_FILES)
    return model, f"hf:{repo}@{revision_of(weights) if weights else 'unknown'}"
