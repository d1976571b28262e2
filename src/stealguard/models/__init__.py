"""Model architectures of the two papers, by name."""

from stealguard.models import architectures as _architectures  # noqa: F401  (registers)
from stealguard.models.base import (
    MODELS,
    Classifier,
    Normalize,
    build_model,
    describe_models,
    register_model,
)

__all__ = ["MODELS", "Classifier", "Normalize", "build_model", "describe_models", "register_model"]
