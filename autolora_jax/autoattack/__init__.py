"""AutoAttack (Croce & Hein, ICML 2020) for L-infinity robustness, in JAX.

    from autolora_jax import autoattack
    result = autoattack.run(logits_fn, x, y, eps=8/255, version='standard', seed=0, batch_size=250)
    result.robust_accuracy, result.robust, result.fell_to, result.x_adv

The standard version runs APGD-CE, APGD-T, FAB-T and Square as a cascade with the original's settings
(`DEFAULTS`); 'fast' runs APGD-CE and APGD-T. Each attack is also a pure, jittable function over a
`logits_fn` (`apgd_ce`, `apgd_t`, `fab_t`, `square`), for use on its own.
"""

from autolora_jax.autoattack.autopgd import apgd, apgd_ce, apgd_t, step_size_checks as apgd_step_size_checks
from autolora_jax.autoattack.cascade import ATTACKS, DEFAULTS, VERSIONS, AutoAttackResult, run
from autolora_jax.autoattack.checks import AutoAttackWarning
from autolora_jax.autoattack.errors import AutoAttackInputError
from autolora_jax.autoattack.fab import fab_t, project_to_hyperplane
from autolora_jax.autoattack.square_attack import side_schedule, square

__all__ = ['run', 'AutoAttackResult', 'AutoAttackWarning', 'AutoAttackInputError', 'ATTACKS', 'VERSIONS',
           'DEFAULTS', 'apgd', 'apgd_ce', 'apgd_t', 'fab_t', 'square', 'apgd_step_size_checks',
           'project_to_hyperplane', 'side_schedule']
