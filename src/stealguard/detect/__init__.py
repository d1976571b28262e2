"""Per-key detection of model stealing while it happens (issue #18).

    prada   PRADA (Juuti et al., EuroS&P 2019): Shapiro-Wilk on minimum query distances
    shift   per-key KS test of the victim's energy / max-softmax scores against held-out
            data (BBSD, Rabanser et al., NeurIPS 2019), calibrated to a false-alarm rate

Detectors never change answers; a policy (flag, throttle, lock) acts on their flags.
`Monitor` holds the per-key states (persisted in a `DetectorStore`) and is what
`LocalBlackBox(monitor=...)`, the service (`serve --detector ...`) and the `detect` task use.
"""

from stealguard.detect import prada as _prada  # noqa: F401  (registers "prada")
from stealguard.detect import shift as _shift  # noqa: F401  (registers "shift")
from stealguard.detect.base import (
    DETECTORS,
    Alarm,
    Detector,
    DetectorComponents,
    DetectorParams,
    DetectorState,
    build_detector,
)
from stealguard.detect.monitor import Monitor, build_monitor, model_logits, parse_detector_args
from stealguard.detect.policy import POLICIES, DetectionRefusal, Policy, build_policy
from stealguard.detect.prada import Prada, PradaParams, shapiro_w
from stealguard.detect.shift import Shift, ShiftParams, ks_statistic
from stealguard.detect.store import DetectorStore

__all__ = [
    "DETECTORS", "POLICIES", "Alarm", "DetectionRefusal", "Detector", "DetectorComponents",
    "DetectorParams", "DetectorState", "DetectorStore", "Monitor", "Policy", "Prada",
    "PradaParams", "Shift", "ShiftParams", "build_detector", "build_monitor", "build_policy",
    "ks_statistic", "model_logits", "parse_detector_args", "shapiro_w",
]
