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
from stealguard.models.generators import (
    GENERATORS,
    Generator,
    GeneratorConfig,
    build_generator,
    to_pixels,
)

__all__ = [
    "GENERATORS", "MODELS", "Classifier", "Generator", "GeneratorConfig", "Normalize",
    "build_generator", "build_model", "describe_models", "register_model", "to_pixels",
]
