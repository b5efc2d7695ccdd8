"""Square Attack (Andriushchenko et al. 2020), L-infinity, untargeted margin loss, as in AutoAttack.

A score-based attack: it uses the logits only, never a gradient, so gradient masking does not stop it.

* start: x + eps * s with s = +-1 drawn per example, per column and per channel (vertical stripes);
* each query: pick a square window of side s_i (`side_schedule`: the fraction p of the image it covers
  starts at p_init = 0.8 and halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 queries), a
  +-1 per channel, move the window to x +- eps, keep the change if the margin loss
  z_y - max_{j != y} z_j decreased or the example became misclassified;
* examples with a margin <= 0 are done; the attack stops when all are.

AutoAttack runs 5000 queries with one restart and p_init = 0.8 (no rescaled schedule). Unlike the original,
which draws one window and colour per query for the whole batch, every example draws its own (from its own
key), so an example's attack does not depend on the batch it is in.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from autolora_jax.autoattack import common


def p_schedule(i: int, p_init: float = 0.8) -> float:
  """The fraction p of the image a window covers at query i (0-based)."""
  for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                     (8000, 256)):
    if i <= bound:
      return p_init / div
  return p_init / 512


def side_schedule(n_queries: int, height: int, width: int, p_init: float = 0.8) -> np.ndarray:
  """The window side per query: round(sqrt(p * H * W)), at least 1, at most min(H, W)."""
  sides = [min(max(int(round(np.sqrt(p_schedule(i, p_init) * height * width))), 1), height, width)
           for i in range(n_queries)]
  return np.asarray(sides, np.int32)


def square(logits_fn: Callable, x, y, key, *, eps, n_queries: int = 5000, p_init: float = 0.8, active=None):
  """L-infinity Square Attack on the margin loss.

  Args:
    logits_fn: maps images (N, H, W, C) in [0, 1] to logits (N, K); only its values are used.
    x: clean images (N, H, W, C) in [0, 1]. y: labels (N,).
    key: a PRNG key, or one per example (N, 2).
    eps: L-infinity radius. n_queries: queries per example (static). p_init: the initial window fraction.
    active: (N,) bool, the examples to attack.
  Returns:
    (x_adv, fooled): x_adv in the ball and [0, 1] (x where nothing was found or inactive) and the (N,) bool
    of examples whose margin reached <= 0.
  """
  x = jnp.asarray(x, jnp.float32)
  n, h, w, c = x.shape
  active = common.set_active(active, n)
  keys = common.row_keys(key, n)
  sides = jnp.asarray(side_schedule(n_queries, h, w, p_init))
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]

  def margin_of(z):
    return common.margin(logits_fn(z), y)

  init_keys, query_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k))(keys), 1, 0)
  stripes = jax.vmap(lambda k: jax.random.rademacher(k, (1, w, c), jnp.float32))(init_keys)
  x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
  margin_min = margin_of(x_best)

  def draws(k, i, side):
    k = jax.random.fold_in(k, i)
    k1, k2, k3 = jax.random.split(k, 3)
    # As the original: an offset in [0, H - s) (the last position H - s is never drawn unless s = H).
    vh = jnp.floor(jax.random.uniform(k1) * (h - side)).astype(jnp.int32)
    vw = jnp.floor(jax.random.uniform(k2) * (w - side)).astype(jnp.int32)
    colour = jax.random.rademacher(k3, (c,), jnp.float32)
    return vh, vw, colour

  def body(s):
    i, x_best, margin_min = s
    side = sides[i]
    vh, vw, colour = jax.vmap(lambda k: draws(k, i, side))(query_keys)
    window = ((rows >= vh[:, None, None, None]) & (rows < vh[:, None, None, None] + side) &
              (cols >= vw[:, None, None, None]) & (cols < vw[:, None, None, None] + side))
    x_new = common.project(x_best + window * (2.0 * eps) * colour[:, None, None, :], x, eps)
    m = margin_of(x_new)
    todo = active & (margin_min > 0)
    better = todo & ((m < margin_min) | (m <= 0))
    x_best = jnp.where(common.bcast(better, x), x_new, x_best)
    margin_min = jnp.where(better, m, margin_min)
    return i + 1, x_best, margin_min

  def cond(s):
    i, _, margin_min = s
    return (i < n_queries) & jnp.any(active & (margin_min > 0))

  _, x_best, margin_min = lax.while_loop(cond, body, (jnp.int32(0), x_best, margin_min))
  fooled = active & (margin_min <= 0)
  return jnp.where(common.bcast(fooled, x), x_best, x), fooled
