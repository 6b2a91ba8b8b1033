"""Stain normalization on torch batches: Macenko, Vahadane, Reinhard, and opt-in HED jitter augmentation."""

from wsikit.stain.augment import HEDJitter
from wsikit.stain.base import (
    Normalizer,
    StainError,
    fit_normalizer,
    from_dict,
    list_methods,
    load_image,
    load_normalizer,
)
from wsikit.stain.macenko import MacenkoNormalizer
from wsikit.stain.reinhard import ReinhardNormalizer
from wsikit.stain.stats import cosine_per_stain
from wsikit.stain.vahadane import VahadaneNormalizer

__all__ = [
    "HEDJitter",
    "MacenkoNormalizer",
    "Normalizer",
    "ReinhardNormalizer",
    "StainError",
    "VahadaneNormalizer",
    "cosine_per_stain",
    "fit_normalizer",
    "from_dict",
    "list_methods",
    "load_image",
    "load_normalizer",
]
