"""The earlier home of the automatic loss scalars and learning rate: both now live in autolora_jax.policy
with the rest of the epoch policy; `schedule.auto_scalars` and `schedule.auto_lr` keep working."""

from autolora_jax.policy import auto_lr, auto_scalars  # noqa: F401
