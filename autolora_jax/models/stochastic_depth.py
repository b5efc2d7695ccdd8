"""Stochastic depth (drop path) for the residual branches of the ConvNeXt and Swin blocks.

In training mode each residual branch of each example is dropped (multiplied by 0) with the block's rate and
otherwise scaled by 1 / (1 - rate), as timm's DropPath. The rates rise linearly over the blocks from 0 to
`config.model.drop_path` (timm's `drop_path_rate`). The draws come from one PRNG key per example
(`drop_keys`: N raw keys (N, 2) uint32 or N typed ones, e.g. `step_parts.example_keys`), folded with the
branch's site number, so that an example's mask does not depend on the batch it shares a device with: any
number of devices trains what one device trains.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp


def block_rates(drop_path: float, depths: Sequence[int]) -> Tuple[Tuple[float, ...], ...]:
  """Each stage's per-block rates: `sum(depths)` rates rising linearly from 0 to `drop_path`, split by stage
  (timm's `linspace(0, drop_path_rate, sum(depths)).split(depths)`)."""
  total = sum(depths)
  rates = [drop_path * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
  out, start = [], 0
  for depth in depths:
    out.append(tuple(rates[start:start + depth]))
    start += depth
  return tuple(out)


def drop_branch(y, drop_keys: Optional[jax.Array], rate: float, site: int):
  """The residual branch y (N, ...) with each example's kept (scaled by 1 / (1 - rate)) or dropped (0), by
  a Bernoulli draw from fold_in(drop_keys[n], site); y itself when `drop_keys` is None or rate is 0.

  Args:
    y: the branch's output, examples first.
    drop_keys: one key per example ((N, 2) uint32 or (N,) typed keys), or None (no stochastic depth:
      evaluation mode).
    rate: the probability of dropping the branch, in [0, 1).
    site: the branch's number in the model, distinct for every branch, so that branches draw apart.
  """
  if drop_keys is None or rate == 0.0:
    return y
  keep = 1.0 - rate
  kept = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, site), keep))(drop_keys)
  scale = jnp.where(kept, 1.0 / keep, 0.0).astype(y.dtype)
  return y * scale.reshape((-1,) + (1,) * (y.ndim - 1))


def check_rate(drop_path) -> None:
  """ValueError unless `drop_path` is a number in [0, 1)."""
  if isinstance(drop_path, bool) or not isinstance(drop_path, (int, float)) or not 0.0 <= drop_path < 1.0:
    raise ValueError(f'drop_path must be a rate in [0, 1) (0: no stochastic depth), got {drop_path!r}.')


def check_call(drop_path: float, train: bool, drop_keys, batch: int, label: str) -> None:
  """ValueError for a training-mode call with drop_path > 0 that gives no key per example."""
  if not (train and drop_path):
    return
  if drop_keys is None:
    raise ValueError(f'A {label} with drop_path={drop_path} in training mode draws its stochastic depth from one '
                     'PRNG key per example: pass drop_keys, N keys (e.g. step_parts.example_keys), or set '
                     'train=False or drop_path=0.0.')
  if drop_keys.shape[0] != batch:
    raise ValueError(f'drop_keys holds {drop_keys.shape[0]} keys for a batch of {batch} images: give one per '
                     'image.')
