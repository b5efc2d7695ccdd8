"""The epoch policy: the automatic loss scalars and the learning-rate state machine on hand-worked curves,
and the state's JSON form."""

import json

import pytest

from autolora_jax import policy


def run_curve(curve, **kwargs):
  """Feeds a robust-accuracy curve (r_1, r_2, ...) and returns per-epoch (lr after, reload, condition)
  and the stop epoch (None if it never stops)."""
  sched = policy.auto_lr(**kwargs)
  state = sched.init()
  lrs, reloads, conditions, stop = [], [], {}, None
  for epoch, r in enumerate(curve, start=1):
    state, d = sched.update(state, epoch, r)
    lrs.append(d.lr)
    if d.reload_best:
      reloads.append(epoch)
      conditions[epoch] = d.condition
    if d.stop:
      stop = epoch
      break
  return lrs, reloads, conditions, stop


def test_auto_scalars():
  assert policy.auto_scalars(0.8) == pytest.approx((0.2, 4.8))
  assert policy.auto_scalars(0.0) == (1.0, 0.0)
  assert policy.auto_scalars(0.5, l2_max=2.0) == (0.5, 1.0)
  with pytest.raises(ValueError):
    policy.auto_scalars(1.5)


def test_window_boundaries():
  assert policy.auto_lr().windows == tuple(range(0, 60, 4))


def test_rising_curve_never_halves():
  lrs, reloads, _, stop = run_curve([e / 100 for e in range(1, 61)])
  assert reloads == [] and set(lrs) == {0.01}
  assert stop == 60  # max_epochs


def test_flat_curve_halves_at_every_checkpoint_until_min_lr():
  lrs, reloads, conditions, stop = run_curve([0.5] * 60)
  assert reloads == [5, 9, 13, 17, 21, 25, 29, 33, 37, 41]  # epochs e with e - 1 in W
  assert set(conditions.values()) == {1}  # no rises at all: condition 1
  assert lrs[4] == 0.005 and lrs[3] == 0.01  # the new lr holds from the epoch after the checkpoint
  assert stop == 41 and lrs[-1] == pytest.approx(0.01 / 2**10)  # 9.8e-6 < 1e-5


def test_condition_1_counts_rises_over_the_window_ending_at_the_checkpoint():
  # Epochs 1-5, pairs (1,2) (2,3) (3,4) (4,5): three rises = 3 >= 0.75 * 4, no halving ...
  _, reloads, _, _ = run_curve([0.1, 0.2, 0.3, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8])
  assert reloads == []
  # ... two rises < 3: halve at epoch 5. The fall at (5, 6) counts for the next window, not this one.
  _, reloads, conditions, _ = run_curve([0.1, 0.2, 0.15, 0.1, 0.4, 0.3, 0.5, 0.6, 0.7])
  assert reloads == [5] and conditions == {5: 1}


def test_condition_2_best_not_improved_since_previous_checkpoint():
  # Epoch 5: 4 rises, best 0.5. Epochs 6-9: 3 rises (enough) but never above 0.5, lr not halved at 5.
  curve = [0.1, 0.2, 0.3, 0.4, 0.5, 0.2, 0.3, 0.4, 0.45]
  for variant in ('paper', 'reference'):
    lrs, reloads, conditions, _ = run_curve(curve, condition2=variant)
    assert reloads == [9] and conditions == {9: 2} and lrs[-1] == 0.005


def test_condition_2_paper_and_reference_differ_after_a_halving():
  # Epoch 5: falling curve, condition 1 halves. Epochs 6-9: 3 rises, best (0.5 at epoch 1) not beaten.
  curve = [0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.2, 0.3, 0.4]
  lrs, reloads, _, _ = run_curve(curve, condition2='paper')  # halved at the previous checkpoint: no
  assert reloads == [5] and lrs[-1] == 0.005
  lrs, reloads, conditions, _ = run_curve(curve, condition2='reference')  # the public code halves again
  assert reloads == [5, 9] and conditions[9] == 2 and lrs[-1] == 0.0025


def test_condition_2_never_fires_at_the_first_checkpoint():
  # Best reached at epoch 1 and never beaten, but the window has 3 rises.
  curve = [0.9, 0.1, 0.2, 0.3, 0.4]
  for variant in ('paper', 'reference'):
    _, reloads, _, _ = run_curve(curve, condition2=variant)
    assert reloads == []


def test_stop_by_min_lr_and_best_tracking():
  lrs, reloads, _, stop = run_curve([0.5] * 20, min_lr=0.004)
  assert reloads == [5, 9] and stop == 9 and lrs[-1] == 0.0025
  sched = policy.auto_lr()
  state = sched.init()
  for epoch, r in enumerate([0.3, 0.5, 0.4], start=1):
    state, d = sched.update(state, epoch, r)
  assert (state.best, state.best_epoch) == (0.5, 2) and not d.new_best


def test_state_serialises_and_resumes_identically():
  curve = [0.1, 0.3, 0.2, 0.25, 0.2, 0.4, 0.35, 0.3, 0.3, 0.5]
  sched = policy.auto_lr()
  state = sched.init()
  straight = []
  for epoch, r in enumerate(curve, start=1):
    state, d = sched.update(state, epoch, r)
    straight.append(d)
  state = sched.init()
  resumed = []
  for epoch, r in enumerate(curve, start=1):
    state = policy.from_dict(json.loads(json.dumps(policy.to_dict(state))))
    state, d = sched.update(state, epoch, r)
    resumed.append(d)
  assert resumed == straight


def test_update_rejects_out_of_order_epochs():
  sched = policy.auto_lr()
  with pytest.raises(ValueError, match='epoch 1'):
    sched.update(sched.init(), 2, 0.5)



def test_autolora_and_fixed_policies_share_one_state_and_decision_type():
  auto = policy.autolora_policy(policy.auto_lr(lr0=0.01))
  fixed = policy.fixed_policy(policy.fixed_lr_schedule('constant', 0.02, 3), 3, 0.0, 6.0)
  for p in (auto, fixed):
    state, decision = p.init({'clean_nat': 0.75})
    assert isinstance(state, policy.PolicyState) and isinstance(decision, policy.Decision)
    state, decision = p.update(state, 1, {'pgd': 0.4, 'clean_nat': 0.7})
    assert isinstance(state, policy.PolicyState) and isinstance(decision, policy.Decision)
    assert (state.best, state.best_epoch, state.best_nat_acc, state.history) == (0.4, 1, 0.7, (0.4,))
    assert decision.new_best and decision.best_epoch == 1
  assert auto.init({'clean_nat': 0.75})[1][:3] == (0.01, 0.25, 4.5)
  assert fixed.init()[1][:3] == (0.02, 0.0, 6.0)
