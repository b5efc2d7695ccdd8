"""The automatic initial learning rate (`config.auto_lr.lr0 = 'auto'`): a short probe before the first epoch.

Each candidate of `config.auto_lr.lr0_candidates` trains the first `config.auto_lr.probe_steps` steps of epoch 1
(0: the whole epoch) from the same start state, with the same batches and random draws, and is scored by the
validation PGD-10 accuracy of the model it leaves; the best one (the first of equals) is kept, and the run goes
on from its state, finishing epoch 1 from the step where the probe stopped. The run is then the run that
`lr0 = pick` makes, step for step (docs/running.md, "The initial learning rate").

Resumable: each finished candidate's score is written at once (atomically) into WORKDIR/lr0_probe.json. A run
stopped in the probe starts again from its start state, skips the candidates already scored and, when the pick
is one of those, trains its probe again (deterministic: the same state as before).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import NamedTuple, Optional, Sequence

from autolora_jax import checkpoints, loop, reporting
from autolora_jax import step_parts as steps
from autolora_jax.errors import NonFiniteLossError, Preempted

log = logging.getLogger(__name__)

PROBE_FILE = 'lr0_probe.json'


def pick(scores: Sequence[dict]) -> Optional[float]:
  """The candidate with the highest validation PGD-10 accuracy ('val_pgd10'; the first of equals); candidates
  that diverged (a None score) never win. None when every candidate diverged."""
  best = None
  for s in scores:
    score = s.get('val_pgd10')
    if score is not None and math.isfinite(score) and (best is None or score > best['val_pgd10']):
      best = s
  return None if best is None else float(best['lr'])


class Result(NamedTuple):
  """The probe's outcome: the picked lr, the replicated state after its probe, where epoch 1 goes on from
  (`train.train`'s position: {'epoch': 1, 'step', 'carry'}), and `summary` (metrics.jsonl's and
  results.json's 'lr0_probe')."""
  lr: float
  state: object
  position: dict
  summary: dict


def read(workdir: str) -> Optional[dict]:
  """WORKDIR/lr0_probe.json, or None (no probe, or a file that cannot be read)."""
  try:
    with open(os.path.join(workdir, PROBE_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def summary_of(record: dict) -> dict:
  """What metrics.jsonl and results.json record of a finished probe: the candidates in order, their
  validation PGD-10 accuracy (None: diverged), the pick, the steps per candidate and the probe's wall time
  (every candidate's training and validation, summed over the calls that ran them, and the re-run of the pick
  after a stop)."""
  by_lr = {s['lr']: s for s in record['scores']}
  plan = record['plan']
  return {'candidates': plan['candidates'], 'val_pgd10': [by_lr[c]['val_pgd10'] for c in plan['candidates']],
          'val_clean_adv': [by_lr[c]['val_clean_adv'] for c in plan['candidates']],
          'pick': record['pick'], 'steps': plan['steps'], 'steps_per_epoch': plan['steps_per_epoch'],
          'seconds': sum(s['seconds'] for s in record['scores']) + record.get('rerun_seconds', 0.0)}


def _load(workdir: str, plan: dict) -> dict:
  """The probe record of this plan (finished candidates kept), or a fresh one (another plan's is dropped:
  the workdir's config decides, and it is the same config)."""
  record = read(workdir)
  if not record or record.get('plan') != plan:
    return {'plan': plan, 'scores': []}
  return record


def _save(workdir: str, record: dict, is_chief: bool) -> None:
  if is_chief:
    reporting.atomic_write(os.path.join(workdir, PROBE_FILE), json.dumps(record, indent=2) + '\n')


def _train(exp, host_state, pstate, lr: float, steps: int, guard):
  """One candidate: `steps` train steps of epoch 1 at `lr` from `host_state`, then validation. Returns
  (state, report, val, seconds); val None when the loss diverged. A stop request (single-process) raises
  Preempted."""
  spe = exp.steps_per_epoch
  state = loop.replicate(host_state)
  state = steps_set(state, lr, pstate)
  start = time.time()
  stop = {'requested': False}

  def on_step(_, step):
    if not guard.multiprocess and guard.requested:
      stop['requested'] = True
      return True
    return step + 1 >= steps

  try:
    state, _, report = loop.train_epoch(
        exp.p_train_step, state, exp.data.train_batches(1, exp.batch_size, 0), seed=exp.seed, epoch=1, steps=spe,
        global_batch=exp.batch_size, progress=exp.progress, desc=f'lr0 probe: lr {lr:g}',
        metrics_every=exp.metrics_every, prefetch=exp.prefetch, on_step=on_step)
  except NonFiniteLossError as e:
    log.warning('lr0 probe: lr %g diverged (%s); it cannot be picked.', lr, str(e).split('.')[0])
    return None, None, None, time.time() - start
  if stop['requested']:
    raise Preempted(
        f'Stopped by {guard.signal_name or "request"} in the lr0 probe (candidate lr {lr:g}); the scores of the '
        f'candidates finished before are kept in {os.path.join(exp.workdir, PROBE_FILE)}. Run the same command '
        f'again (same config and --workdir={exp.workdir}) to resume: the probe goes on with the candidates left, '
        'and the run ends as an uninterrupted one would.', epoch=1, step=0, checkpoint_step=0)
  val = exp.measure(state, 1, desc=f'lr0 probe: lr {lr:g}, validation')
  return state, report, val, time.time() - start


def steps_set(state, lr: float, pstate):
  """The state with the candidate's lr and the policy's first loss scalars."""
  return steps.set_loss_scalars(steps.set_learning_rate(state, lr), pstate.l1, pstate.l2)


def run(exp, state, pstate, guard) -> Result:
  """Runs (or resumes) the probe of `exp.lr0_probe` = (candidates, probe_steps) from the replicated `state`
  (the run's start, after the initial validation), `pstate` the policy's first state (its l1, l2 train
  every candidate)."""
  candidates, probe_steps = exp.lr0_probe
  spe = exp.steps_per_epoch
  n = min(probe_steps or spe, spe)
  plan = {'candidates': [float(c) for c in candidates], 'steps': n, 'steps_per_epoch': spe, 'seed': exp.seed}
  record = _load(exp.workdir, plan)
  done = {s['lr'] for s in record['scores']}
  if done:
    log.info('lr0 probe: resuming; scored before: %s', ', '.join(
        f"lr {s['lr']:g}: {_pct(s['val_pgd10'])}" for s in record['scores']))
  host_state = checkpoints.host_copy(state, True)
  kept = None  # (score, lr, state, report) of the best candidate trained in this call
  for lr in plan['candidates']:
    if lr in done:
      continue
    cand_state, report, val, t = _train(exp, host_state, pstate, lr, n, guard)
    score = None if val is None else float(val['pgd'])
    record['scores'].append({'lr': lr, 'val_pgd10': score, 'val_clean_adv': None if val is None else
                             float(val['clean_adv']), 'seconds': t})
    _save(exp.workdir, record, exp.is_chief)
    log.info('lr0 probe: lr %g -> validation PGD-10 %s', lr, _pct(score))
    if score is not None and (kept is None or score > kept[0]):
      kept = (score, lr, cand_state, report)
  lr = pick(record['scores'])
  if lr is None:
    raise NonFiniteLossError(f'The lr0 probe: every candidate of config.auto_lr.lr0_candidates={tuple(candidates)} '
                             'diverged (non-finite loss). Give smaller candidates, or a fixed config.auto_lr.lr0, '
                             'in a new --workdir or with --overwrite.')
  if kept is None or kept[1] != lr:  # the pick was scored in an earlier call: train its probe again
    log.info('lr0 probe: training the pick (lr %g) again from the same start', lr)
    start = time.time()
    cand_state, report, _, _ = _train(exp, host_state, pstate, lr, n, guard)
    record['rerun_seconds'] = record.get('rerun_seconds', 0.0) + time.time() - start
  else:
    cand_state, report = kept[2], kept[3]
  record['pick'] = lr
  _save(exp.workdir, record, exp.is_chief)
  summary = summary_of(record)
  log.info('lr0 probe: picked lr %g of %s (validation PGD-10 %s) in %.0f s', lr, plan['candidates'],
           ', '.join(_pct(v) for v in summary['val_pgd10']), summary['seconds'])
  return Result(lr=lr, state=cand_state, position={'epoch': 1, 'step': n, 'carry': report.carry}, summary=summary)


def _pct(value) -> str:
  return 'diverged' if value is None else f'{100 * value:.2f}%'
