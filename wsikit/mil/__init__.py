"""Slide-level multiple-instance learning on feature bags: models, training, evaluation."""

from wsikit.mil.base import MILModel, MILOutput
from wsikit.mil.registry import ModelError, ModelSpec, build_model, list_models

__all__ = ["MILModel", "MILOutput", "ModelError", "ModelSpec", "build_model", "list_models"]
