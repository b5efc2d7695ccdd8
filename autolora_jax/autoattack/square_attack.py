"""Square Attack (Andriushchenko et al. 2020), L-infinity, L2 and L1, untargeted margin loss, as in AutoAttack.

A score-based attack: it uses the logits only, never a gradient, so gradient masking does not stop it.

* start: x + eps * s with s = +-1 drawn per example, per column and per channel (vertical stripes);
* each query: pick a square window of side s_i (`side_schedule`: the fraction p of the image it covers
  starts at p_init = 0.8 and halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 queries), a
  +-1 per channel, move the window to x +- eps, keep the change if the margin loss
  z_y - max_{j != y} z_j decreased or the example became misclassified;
* examples with a margin <= 0 are done; the attack stops when all are.

L2 (`square_l2`): the start tiles the image with h // 5 squares of the pattern `eta_pattern` (a +-1 per
example and channel), scaled to the eps-sphere; each query takes two windows of side s (at least 3, odd),
moves window 2's mass into window 1 and adds a fresh signed pattern there, with the window's per-channel
norm set so the whole perturbation stays on the eps-sphere (`square_l2` follows the original's update),
then clips to [0, 1]. L1 follows the same steps with the L1 pattern and window norms, and projects onto the
L1 ball and the box (the original's L1 Square).

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

NORMS = ('Linf', 'L2', 'L1')


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


def square(logits_fn: Callable, x, y, key, *, eps, n_queries: int = 5000, p_init: float = 0.8, active=None,
           norm: str = 'Linf'):
  """Square Attack on the margin loss, L-infinity (below), L2 or L1 (`square_l2`).

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
  common.check_norm(norm, NORMS, 'Square')
  if norm != 'Linf':
    return square_l2(logits_fn, x, y, key, eps=eps, n_queries=n_queries, p_init=p_init, active=active,
                     norm=norm)
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

  def draws(k, i, side):
    k = jax.random.fold_in(k, i)
    k1, k2, k3 = jax.random.split(k, 3)
    # As the original: an offset in [0, H - s) (the last position H - s is never drawn unless s = H).
    vh = jnp.floor(jax.random.uniform(k1) * (h - side)).astype(jnp.int32)
    vw = jnp.floor(jax.random.uniform(k2) * (w - side)).astype(jnp.int32)
    colour = jax.random.rademacher(k3, (c,), jnp.float32)
    return vh, vw, colour

  def propose(i, x_best):
    side = sides[i]
    vh, vw, colour = jax.vmap(lambda k: draws(k, i, side))(query_keys)
    window = ((rows >= vh[:, None, None, None]) & (rows < vh[:, None, None, None] + side) &
              (cols >= vw[:, None, None, None]) & (cols < vw[:, None, None, None] + side))
    return common.project(x_best + window * (2.0 * eps) * colour[:, None, None, :], x, eps)

  return _search(propose, margin_of, x, x_best, active, n_queries)


def _search(propose, margin_of, x, x_best, active, n_queries: int):
  """The queries of Square: x_new = propose(i, x_best) is kept where the margin fell or became <= 0; an
  example with margin <= 0 is done. Returns (x_adv, fooled) as `square`."""
  def body(s):
    i, x_best, margin_min = s
    x_new = propose(i, x_best)
    m = margin_of(x_new)
    todo = active & (margin_min > 0)
    better = todo & ((m < margin_min) | (m <= 0))
    x_best = jnp.where(common.bcast(better, x), x_new, x_best)
    margin_min = jnp.where(better, m, margin_min)
    return i + 1, x_best, margin_min

  def cond(s):
    i, _, margin_min = s
    return (i < n_queries) & jnp.any(active & (margin_min > 0))

  _, x_best, margin_min = lax.while_loop(cond, body, (jnp.int32(0), x_best, margin_of(x_best)))
  fooled = active & (margin_min <= 0)
  return jnp.where(common.bcast(fooled, x), x_best, x), fooled


def side_schedule_l2(n_queries: int, height: int, width: int, p_init: float = 0.8) -> np.ndarray:
  """The L2 window side per query: round(sqrt(p * H * W)), at least 3, made odd, at most min(H, W)."""
  out = []
  for i in range(n_queries):
    side = max(int(round(np.sqrt(p_schedule(i, p_init) * height * width))), 3)
    side += 1 - side % 2
    out.append(min(side, height, width))
  return np.asarray(out, np.int32)


def _unit(a: np.ndarray, norm: str) -> np.ndarray:
  return a / (np.sqrt(np.sum(a ** 2)) if norm == 'L2' else np.sum(np.abs(a)))


def _rectangles(rows: int, cols: int, norm: str = 'L2') -> np.ndarray:
  """Nested rectangles around the centre (rows // 2, cols // 2): a pixel at Chebyshev distance k from it
  (rings clipped to the block) sums 1 / (j + 1)^2 (L2; L1: ^4) over the rings j >= k; unit norm."""
  out = np.zeros((rows, cols))
  if rows == 0 or cols == 0:
    return out
  r0, c0 = rows // 2, cols // 2
  power = 2 if norm == 'L2' else 4
  for k in range(max(r0, c0) + 1):
    out[max(r0 - k, 0):min(r0 + k + 1, rows), max(c0 - k, 0):min(c0 + k + 1, cols)] += 1.0 / (k + 1) ** power
  return _unit(out, norm)


def eta_pattern(side: int, norm: str = 'L2') -> np.ndarray:
  """The Square pattern of a side x side window (L2 or L1): positive rectangles on the top half, negative
  on the bottom half, unit norm."""
  out = np.zeros((side, side))
  out[:side // 2] = _rectangles(side // 2, side, norm)
  out[side // 2:] = -_rectangles(side - side // 2, side, norm)
  return _unit(out, norm)


def _per_channel(d, mask, norm: str):
  """The norm over the masked pixels of d per example and channel: (N, C)."""
  if norm == 'L2':
    return jnp.sqrt(jnp.sum(d * d * mask, axis=(1, 2)))
  return jnp.sum(jnp.abs(d) * mask, axis=(1, 2))


def square_l2(logits_fn: Callable, x, y, key, *, eps, n_queries: int = 5000, p_init: float = 0.8,
              active=None, norm: str = 'L2'):
  """L2 (or L1) Square Attack on the margin loss; arguments and result as `square`. Every example draws its
  own windows, signs and pattern orientation (the original draws one window per query for the batch).

  L1 differs from L2 in the pattern (`eta_pattern(side, 'L1')`), the window norms (L1 per channel), the
  window's new mass (c (max(eps - ||delta||_1, 0) / c + its old mass)) and the map back to the ball: the
  projection onto the L1 ball (radius eps (1 - 1e-6)) and the box instead of rescaling to the sphere.
  """
  x = jnp.asarray(x, jnp.float32)
  n, h, w, c = x.shape
  active = common.set_active(active, n)
  keys = common.row_keys(key, n)
  sides_np = side_schedule_l2(n_queries, h, w, p_init)
  distinct = sorted(set(int(v) for v in sides_np))
  big = max(distinct)
  table = np.zeros((len(distinct), big, big), np.float32)
  for j, side in enumerate(distinct):
    table[j, :side, :side] = eta_pattern(side, norm)
  table = jnp.asarray(table)
  sides = jnp.asarray(sides_np)
  which = jnp.asarray(np.searchsorted(distinct, sides_np).astype(np.int32))
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]

  def margin_of(z):
    return common.margin(logits_fn(z), y)

  # The start: tiles of side h // 5 from ((h - 5 s) // 2, (h - 5 s) // 2), clipped to the image.
  s0 = max(h // 5, 1)
  off = (h - 5 * s0) // 2
  tiles = []
  for a in range(h // s0):
    for b in range(w // s0):
      vh, vw = off + a * s0, off + b * s0
      if vh >= h or vw >= w or vh + s0 <= 0 or vw + s0 <= 0:
        continue
      tiles.append((vh, vw))
  pat = eta_pattern(s0, norm)
  plain = np.zeros((len(tiles), h, w), np.float32)
  turned = np.zeros((len(tiles), h, w), np.float32)
  for t, (vh, vw) in enumerate(tiles):
    for i in range(s0):
      for j in range(s0):
        if 0 <= vh + i < h and 0 <= vw + j < w:
          plain[t, vh + i, vw + j], turned[t, vh + i, vw + j] = pat[i, j], pat[j, i]
  plain, turned = jnp.asarray(plain), jnp.asarray(turned)
  init_keys, query_keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k))(keys), 1, 0)

  def start(k):
    k1, k2 = jax.random.split(k)
    flip = jax.random.bernoulli(k1, 0.5, (len(tiles),))
    signs = jax.random.rademacher(k2, (len(tiles), c), jnp.float32)
    tile = jnp.where(flip[:, None, None], turned, plain)
    return jnp.einsum('thw,tc->hwc', tile, signs)

  def to_ball(delta):
    if norm == 'L2':
      return jnp.clip(x + eps * common.normalize(delta, 'L2'), 0.0, 1.0)
    return common.project_l1(x + delta, x, eps * (1.0 - 1e-6))

  x_best = to_ball(jax.vmap(start)(init_keys))

  def draws(k, i, side):
    k = jax.random.fold_in(k, i)
    k1, k2, k3, k4, k5, k6 = jax.random.split(k, 6)
    pos = [jnp.floor(jax.random.uniform(kk) * (lim - side)).astype(jnp.int32)
           for kk, lim in ((k1, h), (k2, w), (k3, h), (k4, w))]
    return pos, jax.random.bernoulli(k5, 0.5), jax.random.rademacher(k6, (c,), jnp.float32)

  def propose(i, x_best):
    side = sides[i]
    (vh, vw, vh2, vw2), flip, colour = jax.vmap(lambda k: draws(k, i, side))(query_keys)
    e = lambda v: v[:, None, None]
    r1, c1 = rows - e(vh), cols - e(vw)
    in1 = (r1 >= 0) & (r1 < side) & (c1 >= 0) & (c1 < side)
    in2 = ((rows >= e(vh2)) & (rows < e(vh2) + side) & (cols >= e(vw2)) & (cols < e(vw2) + side))
    ri, ci = jnp.clip(r1, 0, big - 1), jnp.clip(c1, 0, big - 1)
    ri, ci = jnp.where(e(flip), ci, ri), jnp.where(e(flip), ri, ci)
    pattern = jnp.where(in1, table[which[i]][ri, ci], 0.0)  # (N, H, W)
    m1, m2 = in1[..., None].astype(x.dtype), in2[..., None].astype(x.dtype)
    delta = x_best - x
    norm_w1 = _per_channel(delta, m1, norm)
    norm_image = common.lp(delta, norm)
    norm_windows = _per_channel(delta, jnp.maximum(m1, m2), norm)
    new = pattern[..., None] * colour[:, None, None, :] + delta * m1 / (norm_w1[:, None, None, :] + 1e-12)
    if norm == 'L2':
      size = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0)[:, None] / c + norm_windows ** 2)
    else:
      size = (jnp.maximum(eps - norm_image, 0.0)[:, None] / c + norm_windows) * c
    new = new / (_per_channel(new, m1, norm)[:, None, None, :] + 1e-12) * size[:, None, None, :]
    return to_ball(jnp.where(m1 > 0, new, delta * (1.0 - m2)))

  return _search(propose, margin_of, x, x_best, active, n_queries)
