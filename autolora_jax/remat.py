"""Rematerialisation of the loss's forward passes: a train step that holds one forward pass's activations.

A method's loss makes one training-mode forward pass per branch (AutoLoRa's: the natural branch on x, then the
adversarial one on x_adv), and its gradient keeps the activations of all of them until the backward pass
ends. `in_turn(forward)` gives the loss forwards that keep only their inputs: the backward pass recomputes
each forward pass just before its own backward pass, the last call first, one call after another. The peak
then holds one forward pass's activations instead of all, for one more forward pass of compute per call.

XLA orders a program by its data dependencies alone (an optimisation barrier only keeps it from merging two
computations), so the order is made a dependency (`after`): a recomputation starts from its input plus zero
times one entry of its own cotangent and of a token that the later call's backward pass returns once all of
its gradients exist.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

# config.model.remat: 'none' keeps every forward pass's activations; 'forwards' recomputes them in turn.
MODES = ('none', 'forwards')


def after(x, deps):
  """x, computed only once every array of the pytree `deps` is: x + 0 * (one entry of each, summed).

  The product is not folded away (0 * inf is NaN for floats, so compilers keep it); x is otherwise unchanged.
  """
  dep = sum((jnp.ravel(leaf)[0].astype(jnp.float32) for leaf in jax.tree.leaves(deps)), jnp.zeros((), jnp.float32))
  return x + (0.0 * dep).astype(x.dtype)


def in_turn(forward: Callable) -> Callable:
  """`forward(params, stats, x, **kwargs) -> outputs`, recomputed in the backward pass one call at a time.

  The n-th call's recomputation waits for the gradients of call n + 1, so the backward pass holds the
  activations of one call. Values and gradients are the plain forward's (within float round-off: the
  compiler may fuse the recomputation differently). Array keyword arguments (e.g. drop_keys) pass through;
  the others are static. Make a new one for every trace of the loss: it numbers its calls.
  """
  tokens = []

  def call(params, stats, x, **kwargs):
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
    static = {k: v for k, v in kwargs.items() if k not in arrays}

    def run(p, s, z, a):
      return forward(p, s, z, **static, **a)

    @jax.custom_vjp
    def recomputed(p, s, z, a, token):
      return run(p, s, z, a), token

    def fwd(p, s, z, a, token):
      is_primal = lambda v: hasattr(v, 'perturbed')
      perturbed = tuple(any(v.perturbed for v in jax.tree.leaves(tree, is_leaf=is_primal)) for tree in (s, z))
      p, s, z, a, token = (jax.tree.map(lambda v: v.value, tree, is_leaf=is_primal) for tree in (p, s, z, a, token))
      return (run(p, s, z, a), token), (p, s, z, a, perturbed)

    def bwd(res, cotangents):
      p, s, z, a, (s_perturbed, z_perturbed) = res
      g_out, g_token = jax.tree.map(lambda g: jnp.zeros(g.shape, g.dtype) if isinstance(g, SymbolicZero) else g,
                                    cotangents, is_leaf=lambda g: isinstance(g, SymbolicZero))
      z = after(z, (g_out, g_token))
      _, vjp = jax.vjp(lambda p, s, z: run(p, s, z, a), p, s, z)
      gp, gs, gz = vjp(g_out)
      return (gp, gs if s_perturbed else None, gz if z_perturbed else None, None, after(g_token, gp))

    recomputed.defvjp(fwd, bwd, symbolic_zeros=True)
    token = tokens[-1] if tokens else jnp.zeros((), jnp.float32)
    out, token = recomputed(params, stats, x, arrays, token)
    tokens.append(token)
    return out

  return call
