"""AutoLoRa's disentangled loss over logits (docs/method.md, "Loss, per batch"), and TWINS's two losses.

    L = l1 * CE(z_nat, y) + (1 - l1) * CE(z_adv, y) + l2 * KL(p_nat || p_adv)

The functions take logits and numbers only; which parameters each logit depends on (the gradient routing)
is decided by the train step that produces them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
  """Mean cross-entropy of logits (N, K) against integer labels (N,)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def kl_divergence(p_logits, q_logits, denominator=None):
  """KL(softmax(p_logits) || softmax(q_logits)), summed over classes and averaged over the batch.

  `denominator` replaces the batch size in the average (None: the actual batch size).
  """
  log_p = jax.nn.log_softmax(p_logits)
  log_q = jax.nn.log_softmax(q_logits)
  per_example = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  n = per_example.shape[0] if denominator is None else denominator
  return per_example.sum() / n


def autolora_loss(nat_logits, adv_logits, labels, l1, l2, kl_denominator=None):
  """docs/method.md's loss. Returns (loss, {'ce_nat', 'ce_adv', 'kl'}).

  Args:
    nat_logits: logits of the natural branch on the clean batch, (N, K).
    adv_logits: logits of the adversarial branch on the adversarial batch, (N, K).
    labels: (N,) integers.
    l1: weight of the natural CE in [0, 1]; the adversarial CE gets 1 - l1.
    l2: weight of the KL term (>= 0).
  """
  ce_nat = cross_entropy(nat_logits, labels)
  ce_adv = cross_entropy(adv_logits, labels)
  kl = kl_divergence(nat_logits, adv_logits, kl_denominator)
  loss = l1 * ce_nat + (1.0 - l1) * ce_adv + l2 * kl
  return loss, {'ce_nat': ce_nat, 'ce_adv': ce_adv, 'kl': kl}


def twins_at_loss(frozen_logits, adaptive_logits, frozen_labels, adaptive_labels, lam):
  """TWINS-AT: lam * CE(frozen half) + CE(adaptive half), each a mean over its half of the adversarial batch.

  Returns (loss, {'ce_frozen', 'ce_adaptive'}).
  """
  ce_f = cross_entropy(frozen_logits, frozen_labels)
  ce_a = cross_entropy(adaptive_logits, adaptive_labels)
  return lam * ce_f + ce_a, {'ce_frozen': ce_f, 'ce_adaptive': ce_a}


def twins_trades_loss(nat_frozen, adv_frozen, nat_adaptive, adv_adaptive, frozen_labels, adaptive_labels,
                      lam, beta, kl_denominator):
  """TWINS-TRADES, as the authors' train-TWINS-TRADES.py computes it:

      lam * CE(nat_f) + CE(nat_a) + beta * [lam * KL(p_nat_f || p_adv_f) + KL(p_nat_a || p_adv_a)]

  the CEs on the clean logits (means over each half), each KL summed over classes and examples and divided
  by `kl_denominator`: their configured batch size, the whole batch of both halves. Gradients flow through
  both sides of each KL. Returns (loss, {'ce_frozen', 'ce_adaptive', 'kl_frozen', 'kl_adaptive'}).
  """
  ce_f = cross_entropy(nat_frozen, frozen_labels)
  ce_a = cross_entropy(nat_adaptive, adaptive_labels)
  kl_f = kl_divergence(nat_frozen, adv_frozen, kl_denominator)
  kl_a = kl_divergence(nat_adaptive, adv_adaptive, kl_denominator)
  loss = lam * ce_f + ce_a + beta * (lam * kl_f + kl_a)
  return loss, {'ce_frozen': ce_f, 'ce_adaptive': ce_a, 'kl_frozen': kl_f, 'kl_adaptive': kl_a}
