"""Checks of single config values with one-paragraph errors, shared by config_checks and the methods' own
section checks (autolora_jax/methods/)."""

from __future__ import annotations

from typing import Iterable

from autolora_jax.errors import ConfigError

LR_SCHEDULES = ('constant', 'piecewise', 'cosine')  # a fixed schedule's lr_schedule (policy.fixed_lr_schedule)


def choice(name: str, value, choices: Iterable) -> None:
  """ConfigError unless config.<name> = value is one of `choices`."""
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f'config.{name}={value!r} is not supported: choose one of {choices} '
                      f'(e.g. --config.{name}={choices[0]}).')


def positive_int(name: str, value) -> None:
  """ConfigError unless config.<name> = value is an integer > 0."""
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f'config.{name} must be a positive integer, got {value!r}.')


def in_range(name: str, value, low: float, high: float, low_open: bool = True) -> None:
  """ConfigError unless config.<name> = value is a number in (low, high] ([low, high] with low_open=False)."""
  ok = isinstance(value, (int, float)) and (low < value if low_open else low <= value) and value <= high
  if not ok:
    bracket = '(' if low_open else '['
    raise ConfigError(f'config.{name} must lie in {bracket}{low}, {high}], got {value!r}.')


def check_lr_schedule(key: str, c, what: str) -> None:
  """config.<key>'s fixed learning-rate schedule (policy.fixed_lr_schedule): lr, lr_schedule, epochs,
  boundaries and decay; `what` names the run it drives."""
  if c.lr_schedule not in LR_SCHEDULES:
    raise ConfigError(f'config.{key}.lr_schedule={c.lr_schedule!r} is not supported: choose one of '
                      f'{LR_SCHEDULES} (e.g. --config.{key}.lr_schedule=piecewise).')
  if not isinstance(c.epochs, int) or isinstance(c.epochs, bool) or c.epochs <= 0:
    raise ConfigError(f'config.{key}.epochs must be a positive integer (the length of {what}), got '
                      f'{c.epochs!r}.')
  if not isinstance(c.lr, (int, float)) or not 0 < c.lr <= 10:
    raise ConfigError(f'config.{key}.lr must lie in (0, 10], got {c.lr!r}.')
  if not isinstance(c.decay, (int, float)) or not 0 < c.decay <= 1:
    raise ConfigError(f'config.{key}.decay (the piecewise schedule\'s factor at each boundary) must lie in '
                      f'(0, 1], got {c.decay!r}.')
  b = tuple(c.boundaries)
  if (not all(isinstance(e, int) and not isinstance(e, bool) for e in b) or list(b) != sorted(set(b))
      or (b and not 0 < b[0] <= b[-1] < c.epochs)):
    raise ConfigError(f'config.{key}.boundaries must be increasing whole epochs inside (0, {key}.epochs='
                      f'{c.epochs}), after which the lr is multiplied by {key}.decay; got {b!r} (e.g. '
                      f'--config.{key}.boundaries="({c.epochs // 2}, {3 * c.epochs // 4})").')
