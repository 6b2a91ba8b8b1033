"""wsikit: whole-slide images from scanner files to feature bags, slide-level models and heatmaps."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsikit")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

from wsikit.slide import MPPError, Slide, SlideError, mag_to_mpp, mpp_to_mag, open_slide

__all__ = ["MPPError", "Slide", "SlideError", "__version__", "mag_to_mpp", "mpp_to_mag", "open_slide"]
