"""AutoAttack (Croce & Hein, ICML 2020) in JAX, under L-infinity, L2 and L1 budgets.

    from autolora_jax import autoattack
    result = autoattack.run(logits_fn, x, y, eps=8/255, norm='Linf', version='standard', seed=0)
    result.robust_accuracy, result.robust, result.fell_to, result.x_adv

`run(..., on_progress=f)` calls f with a `CascadeState` at every pass start and after every batch;
`run(..., resume=state)` continues from one (a resumable evaluation: evaluation.py, eval_progress.py).

The versions are the original's (`version_attacks`, `version_settings`): 'standard' (APGD-CE, APGD-T,
FAB-T, Square), 'plus', 'rand' (EOT, for randomised models) and 'custom'
(attacks=[...]); 'fast' runs APGD-CE and APGD-T. Each attack is also a pure, jittable function over a
`logits_fn` (`apgd`, `apgd_ce`, `apgd_t`, `fab`, `fab_t`, `square`), for use on its own.
"""

from autolora_jax.autoattack.autopgd import apgd, apgd_ce, apgd_t
from autolora_jax.autoattack.autopgd import step_size_checks as apgd_step_size_checks
from autolora_jax.autoattack.cascade import (
                                             ATTACK_NORMS,
                                             ATTACKS,
                                             DEFAULTS,
                                             NORMS,
                                             VERSIONS,
                                             AutoAttackResult,
                                             CascadeState,
                                             buckets,
                                             run,
                                             version_attacks,
                                             version_settings,
)
from autolora_jax.autoattack.checks import AutoAttackWarning
from autolora_jax.autoattack.common import project_ball, project_l1, project_l2
from autolora_jax.autoattack.errors import AutoAttackInputError
from autolora_jax.autoattack.fab import (
                                             fab,
                                             fab_t,
                                             project_to_hyperplane,
                                             project_to_hyperplane_l1,
                                             project_to_hyperplane_l2,
)
from autolora_jax.autoattack.square_attack import side_schedule, square

__all__ = ['run', 'AutoAttackResult', 'CascadeState', 'AutoAttackWarning', 'AutoAttackInputError', 'ATTACKS', 'ATTACK_NORMS',
           'NORMS', 'VERSIONS', 'DEFAULTS', 'version_attacks', 'version_settings', 'buckets', 'apgd', 'apgd_ce',
           'apgd_t', 'fab', 'fab_t', 'square', 'apgd_step_size_checks', 'project_to_hyperplane',
           'project_to_hyperplane_l2', 'project_to_hyperplane_l1', 'project_ball', 'project_l2',
           'project_l1', 'side_schedule']
