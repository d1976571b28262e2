"""Model-stealing attacks, all through the black box, registered by name.

    knockoff             KnockoffNets, random strategy (knockoff.py)
    adaptive_averaging   EDM appendix A.1: K perturbed queries per image, answers averaged
    jbda                 Papernot et al. 2017 (jacobian.py)
    jbda_tr              JBDA toward a random target class (Juuti et al. 2019)
    jb_self, jb_top3     Juuti et al. 2019 as the MAD paper describes them
    dfme                 Truong et al. 2021, data-free (dfme.py; the shared loop in datafree.py)
    maze                 Kariyappa et al. 2021, data-free (maze.py)

Every attack declares typed `Params` (an `AttackParams` model: the attacker's options such as
labels, arch, nquery, the clone's training, and the attack's own fields such as the Jacobian
family's preset, seed_size, rounds, step) and trains its clone through `train_clone`;
`build_attack(name, data, params)` builds one (like `build_defense`), `AttackConfig` (name,
params, data) is what specs and the CLI hand over, and `accuracy_vs_budget` (curves.py)
measures an attack across budgets.
"""

from stealguard.attacks.adaptive import AdaptiveAveraging
from stealguard.attacks.base import (
    ATTACKS,
    Attack,
    AttackParams,
    AttackResult,
    answers_to_targets,
    query_all,
    train_clone,
    validate_attack_params,
)
from stealguard.attacks.build import (
    attack_params_class,
    build_attack,
    describe_attacks,
    parse_attack_params,
    validate_attack,
)
from stealguard.attacks.config import AttackConfig
from stealguard.attacks.curves import accuracy_vs_budget
from stealguard.attacks.datafree import DataFreeAttack, DataFreeParams, zeroth_order_gradient
from stealguard.attacks.dfme import DFME, DFMEParams
from stealguard.attacks.jacobian import (
    JACOBIAN_PRESETS,
    JBDA,
    JacobianAttack,
    JacobianConfig,
    JacobianParams,
    jacobian_config,
    sign_gradient,
)
from stealguard.attacks.jb_self import JBSelf
from stealguard.attacks.jb_top3 import JBTop3
from stealguard.attacks.jbda_tr import JBDATR
from stealguard.attacks.knockoff import KnockoffNets
from stealguard.attacks.maze import MAZE, MAZEParams
from stealguard.attacks.options import (
    AttackerOptions,
    CloneOptions,
    parse_options,
    query_images,
)
from stealguard.attacks.transforms import AffineColorJitter, random_affine_color

__all__ = [
    "ATTACKS", "DFME", "MAZE", "DFMEParams", "DataFreeAttack", "DataFreeParams", "MAZEParams",
    "zeroth_order_gradient", "JACOBIAN_PRESETS", "JBDA", "JBDATR", "AdaptiveAveraging", "AffineColorJitter",
    "Attack", "AttackConfig", "AttackParams", "AttackResult", "AttackerOptions",
    "CloneOptions", "JBSelf", "JBTop3", "JacobianAttack", "JacobianConfig", "JacobianParams",
    "KnockoffNets", "accuracy_vs_budget", "answers_to_targets", "attack_params_class",
    "build_attack", "describe_attacks", "jacobian_config", "parse_attack_params",
    "parse_options", "query_all", "query_images", "random_affine_color", "sign_gradient",
    "train_clone", "validate_attack", "validate_attack_params",
]
