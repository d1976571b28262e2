"""Artifact formats: one registry, one class per kind of artifact (see base.py).

    stealguard.classifier   classifier.py   one registered architecture (safetensors)
    stealguard.edm          edm.py          an EDM bundle: members + secret hash
    stealguard.module       imported.py     your own architecture: factory + state_dict
    stealguard.onnx         onnx.py         an ONNX graph, answered by onnxruntime
"""

from stealguard.formats import classifier as _classifier  # noqa: F401  (registers)
from stealguard.formats import edm as _edm  # noqa: F401  (registers)
from stealguard.formats import imported as _imported  # noqa: F401  (registers)
from stealguard.formats import onnx as _onnx  # noqa: F401  (registers)
from stealguard.formats.base import (
    FORMATS,
    MANIFEST,
    ArtifactFormat,
    ArtifactInfo,
    describe_artifact,
    format_for,
    format_of,
    load_member,
    load_selector,
    load_standin,
    load_victim,
    read_format,
    register_format,
    save_victim,
)

__all__ = [
    "FORMATS", "MANIFEST", "ArtifactFormat", "ArtifactInfo", "describe_artifact", "format_for",
    "format_of", "load_member", "load_selector", "load_standin", "load_victim", "read_format",
    "register_format", "save_victim",
]
