"""wsikit: whole-slide images from scanner files to feature bags, slide-level models and heatmaps."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("wsikit")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["MPPError", "Slide", "SlideError", "__version__", "mag_to_mpp", "mpp_to_mag", "open_slide"]


def __getattr__(name: str) -> Any:
    """The slide layer's names, imported on first use (so ``import wsikit`` alone stays instant)."""
    if name in __all__:
        from wsikit import slide

        return getattr(slide, name)
    raise AttributeError(f"module 'wsikit' has no attribute {name!r}")
