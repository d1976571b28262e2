"""Model-stealing attacks, all through the black box, registered by name.

    knockoff             KnockoffNets, random strategy (knockoff.py)
    adaptive_averaging   EDM appendix A.1: K perturbed queries per image, answers averaged
    jbda                 Papernot et al. 2017 (jacobian.py)
    jbda_tr              JBDA toward a random target class (Juuti et al. 2019)
    jb_self, jb_top3     Juuti et al. 2019 as the MAD paper describes them

Every attack takes `AttackerOptions` (labels, arch, nquery, nquery+aug, ...) and trains its
clone through `train_clone`; `build_attack(name, ...)` builds one from plain options and
`accuracy_vs_budget` (curves.py) measures it across budgets.
"""

from stealguard.attacks.adaptive import AdaptiveAveraging
from stealguard.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    answers_to_targets,
    query_all,
    train_clone,
)
from stealguard.attacks.build import build_attack
from stealguard.attacks.curves import accuracy_vs_budget
from stealguard.attacks.jacobian import (
    JACOBIAN_PRESETS,
    JBDA,
    JacobianAttack,
    JacobianConfig,
    jacobian_config,
    sign_gradient,
)
from stealguard.attacks.jb_self import JBSelf
from stealguard.attacks.jb_top3 import JBTop3
from stealguard.attacks.jbda_tr import JBDATR
from stealguard.attacks.knockoff import KnockoffNets
from stealguard.attacks.options import AttackerOptions, parse_options, query_images
from stealguard.attacks.transforms import AffineColorJitter, random_affine_color

__all__ = [
    "ATTACKS", "JACOBIAN_PRESETS", "JBDA", "JBDATR", "AdaptiveAveraging", "AffineColorJitter",
    "Attack", "AttackResult", "AttackerOptions", "JBSelf", "JBTop3", "JacobianAttack",
    "JacobianConfig", "KnockoffNets", "accuracy_vs_budget", "answers_to_targets",
    "build_attack", "jacobian_config", "parse_options", "query_all", "query_images",
    "random_affine_color", "sign_gradient", "train_clone",
]
