"""Output defenses: `(x, probs) -> probs`, registered by name.

Registered (importing this package registers them): none, topk, rounding, reverse_sigmoid,
random_noise, mad, mad_argmax, adaptive_misinformation. Build one from CLI-style strings:

    build_defense("mad", parse_defense_params(["epsilon=0.5"]), victim=victim)
"""

from stealguard.defenses import (  # noqa: F401  (importing registers the defenses)
    adaptive_misinformation,
    mad,
    random_noise,
    reverse_sigmoid,
    rounding,
    topk,
)
from stealguard.defenses.adaptive_misinformation import (
    AdaptiveMisinformation,
    train_misinformation,
    train_outlier_exposure,
)
from stealguard.defenses.base import (
    DEFENSES,
    Budget,
    CheckedDefense,
    Compose,
    Defense,
    DefenseParams,
    NoDefense,
    check_probs,
)
from stealguard.defenses.builder import build_defense, describe_defenses, parse_defense_params
from stealguard.defenses.config import DefenseConfig
from stealguard.defenses.distances import DISTANCES
from stealguard.defenses.mad import MAD, MADArgmax
from stealguard.defenses.metrics import defense_metrics
from stealguard.defenses.random_noise import RandomNoise
from stealguard.defenses.reverse_sigmoid import ReverseSigmoid
from stealguard.defenses.rounding import Rounding
from stealguard.defenses.topk import TopK

__all__ = [
    "DEFENSES", "DISTANCES", "MAD", "AdaptiveMisinformation", "Budget", "CheckedDefense",
    "Compose", "Defense", "DefenseConfig", "DefenseParams", "MADArgmax", "NoDefense", "RandomNoise",
    "ReverseSigmoid", "Rounding", "TopK", "build_defense", "check_probs", "defense_metrics",
    "describe_defenses", "parse_defense_params", "train_misinformation",
    "train_outlier_exposure",
]
