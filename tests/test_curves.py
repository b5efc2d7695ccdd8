"""curves.png marks the epoch policy's decisions (lr halved, best reloaded, stop, the lr0 probe's pick) on the
validation curve, read from metrics.jsonl (`reporting.decision_marks`: the data behind the marks)."""

import os

from autolora_jax import policy, reporting


def _records():
  """metrics.jsonl as a run of AutoLoRa writes it (train.train's fields), with the decisions that
  policy.auto_lr takes on a robust accuracy that rises, then stalls."""
  sched = policy.auto_lr(lr0=0.01, window=2, max_epochs=9)
  state = sched.init()
  probe = {'candidates': [0.003, 0.01], 'val_pgd10': [0.2, 0.3], 'pick': 0.01, 'steps': 5, 'steps_per_epoch': 5,
           'seconds': 3.0}
  records = [{'epoch': 0, 'lr': 0.01, 'l1': 0.5, 'l2': 3.0, 'val_clean_adv': 0.4, 'val_clean_nat': 0.5,
              'lr0_probe': probe}]
  for epoch, r in enumerate([0.30, 0.35, 0.40, 0.38, 0.37, 0.36, 0.36, 0.35, 0.34], start=1):
    lr = state.lr
    state, d = sched.update(state, epoch, r)
    records.append({'epoch': epoch, 'lr': lr, 'l1': 0.5, 'l2': 3.0, 'val_clean_adv': r + 0.2,
                    'val_clean_nat': r + 0.3, 'val_pgd10': r, 'new_best': d.new_best, 'best_epoch': d.best_epoch,
                    'reload_best': d.reload_best, 'condition': d.condition, 'next_lr': d.lr, 'stop': d.stop})
    if d.stop:
      break
  return records


def test_every_decision_of_metrics_jsonl_is_marked(tmp_path):
  records = _records()
  marks = reporting.decision_marks(records)
  halvings = [r['epoch'] for r in records if r.get('condition')]
  assert len(halvings) >= 2  # the accuracy stalls: the schedule halves more than once
  assert [m['epoch'] for m in marks if m['kind'] == 'halve'] == halvings
  assert [m['epoch'] for m in marks if m['kind'] == 'reload'] == [r['epoch'] for r in records if r.get('reload_best')]
  assert [m['epoch'] for m in marks if m['kind'] == 'stop'] == [records[-1]['epoch']] == [9]
  for m in marks:
    if m['kind'] != 'lr0_pick':
      assert m['value'] == records[m['epoch']]['val_pgd10']  # on the validation PGD-10 curve
  first = next(m for m in marks if m['kind'] == 'halve')
  assert first['label'] == f"lr 0.01 -> 0.005 (condition {records[first['epoch']]['condition']})"
  assert next(m for m in marks if m['kind'] == 'reload')['label'] == 'best of epoch 3 reloaded'
  assert marks[0] == {'epoch': 0, 'kind': 'lr0_pick', 'value': None,
                      'label': 'lr0 0.01 picked by the probe (val. PGD-10 %: 0.003: 20.0, 0.01: 30.0)'}
  path = os.path.join(tmp_path, reporting.CURVES_FILE)
  reporting.plot_curves(records, path)
  assert os.path.getsize(path) > 5000


def test_fixed_schedules_and_failed_reloads():
  records = [{'epoch': 1, 'lr': 0.01, 'next_lr': 0.01, 'val_pgd10': 0.3, 'condition': 0, 'stop': False},
             {'epoch': 2, 'lr': 0.01, 'next_lr': 0.001, 'val_pgd10': 0.4, 'condition': 0, 'stop': False},
             {'epoch': 3, 'lr': 0.001, 'next_lr': 0.001, 'val_pgd10': 0.5, 'condition': 1, 'reload_best': True,
              'reload_failed': True, 'best_epoch': 2, 'stop': True}]
  kinds = [(m['epoch'], m['kind']) for m in reporting.decision_marks(records)]
  assert kinds == [(2, 'lr_step'), (3, 'halve'), (3, 'stop')]  # the reload that failed is not marked
