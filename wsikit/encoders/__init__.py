"""Tile encoders: one registry name gives the model, its preprocessing, embedding rule and weights.

The registry (:mod:`.spec`, :mod:`.catalog`) is plain data and imports without torch, so listing it
is fast; the torch side (:class:`Encoder`, :func:`get_encoder`, weights loading) is imported on first
use of one of its names.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from wsikit.encoders.catalog import pathology_names, register_catalog
from wsikit.encoders.spec import (
    HIBOU_MEAN,
    HIBOU_STD,
    HOPTIMUS_MEAN,
    HOPTIMUS_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    LUNIT_MEAN,
    LUNIT_STD,
    OPENAI_MEAN,
    OPENAI_STD,
    EncoderError,
    EncoderSpec,
    encoder_spec,
    list_encoders,
    register_encoder,
    registry,
)

_LAZY = {
    "Encoder": "build",
    "ResNetTrunk": "build",
    "get_encoder": "build",
    "build_backbone": "build",
    "EmbeddingRule": "pooling",
    "RULES": "pooling",
    "TokenPooling": "pooling",
    "embedding_rule": "pooling",
    "apply_state_dict": "weights",
    "load_state_dict": "weights",
    "load_efficientnet_lite0": "weights",
    "sha256_file": "weights",
}

__all__ = [
    "HIBOU_MEAN",
    "HIBOU_STD",
    "HOPTIMUS_MEAN",
    "HOPTIMUS_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "LUNIT_MEAN",
    "LUNIT_STD",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "EncoderError",
    "EncoderSpec",
    "encoder_spec",
    "list_encoders",
    "pathology_names",
    "register_encoder",
    "registry",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """The torch-side names, imported on first use (PEP 562) so the registry stays torch-free."""
    if name in _LAZY:
        return getattr(import_module(f"wsikit.encoders.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'wsikit.encoders' has no attribute {name!r}")


register_catalog()
