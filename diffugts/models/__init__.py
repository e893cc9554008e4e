"""Torch models (the source of truth): MAISI backbone from MONAI, MiniLM text encoder, our heads."""

from .pipeline_models import DiffuGTSModels, build_models

__all__ = ["DiffuGTSModels", "build_models"]
