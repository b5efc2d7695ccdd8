"""The error type of the autoattack package (self-contained: it imports nothing else of autolora_jax)."""


class AutoAttackInputError(ValueError):
  """Bad arguments to `autoattack.run` (shapes, value range, eps, version, attacks, batch size); the
  message says what is wrong and how to fix it."""
