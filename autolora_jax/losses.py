"""AutoLoRa's disentangled loss over logits (SPEC.md, "Loss, per batch").

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
  """SPEC.md's loss. Returns (loss, {'ce_nat', 'ce_adv', 'kl'}).

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
