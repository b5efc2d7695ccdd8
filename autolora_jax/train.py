"""Robust fine-tuning: `train_and_evaluate(config, workdir)`, the one training loop of every method
(`config.method`, a registered `methods.Method`: AutoLoRa, vanilla RFT, PGD-AT, TWINS, LoRa-AT or one of
your own; see autolora_jax/methods/).

`train(exp, ...)`, per epoch: train (pmapped step over all local devices), validate (clean accuracy of both
branches, PGD-10 robust accuracy of the deployed one; with config.eval.val_attacks also those AutoAttack
attacks, recorded only), let the method's epoch policy (policy.py: the
automatic learning rate and loss scalars, or fixed ones) set the next epoch's lr and scalars, keep the best
checkpoint, reload it when the policy says so, save the latest state, log. With config.auto_lr.lr0='auto' a
probe picks the initial learning rate first (lr_probe.py) and epoch 1 goes on from the pick's state. At the end
(evaluation.test): test accuracy (clean, PGD-10, AutoAttack) of the best and of the final checkpoint into
results.json.

Starting it again on the same workdir resumes after the last completed epoch, or at the step where a
SIGTERM/SIGINT stopped it, and ends with the same result as an uninterrupted run (the data order and every
random draw are functions of seed, epoch, step). It resumes from the newest checkpoint that can be read: a
damaged one is moved aside and kept (checkpoints.py), and the epochs after the intact one are trained again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from autolora_jax import checkpoints, evaluation, experiment, loop, lr_probe, policy, preemption, reporting, steps
from autolora_jax import workdir as workdirs
from autolora_jax.errors import InputError, Preempted, WorkdirError

log = logging.getLogger(__name__)


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir if needed and checks that it can be written; returns its absolute path."""
  if not workdir:
    raise WorkdirError('No workdir given: pass --workdir=DIR, the folder for checkpoints, logs and results.')
  path = os.path.abspath(os.path.expanduser(workdir))
  workdirs.check_writable(path)
  return path


class Writers:
  """The chief's per-epoch outputs: metrics.jsonl, TensorBoard and curves.png (every `plot_every` epochs and
  at the end; no-ops elsewhere)."""

  def __init__(self, workdir: str, is_chief: bool, tensorboard: bool, plot_every: int = 1):
    self.workdir, self.is_chief, self.plot_every = workdir, is_chief, max(1, int(plot_every))
    self.log = reporting.MetricsLog(workdir)
    self.tb = reporting.TensorBoard(workdir, enabled=tensorboard and is_chief)

  def truncate(self, last_epoch: int) -> None:
    if self.is_chief:
      self.log.truncate(last_epoch)

  def epoch(self, record: dict) -> None:
    if not self.is_chief:
      return
    self.log.append(record)
    self.tb.scalars(record['epoch'], {k: v for k, v in record.items() if k != 'epoch'})
    if record['epoch'] % self.plot_every == 0 or record.get('stop'):  # and at the end
      reporting.plot_curves(self.log.read(), os.path.join(self.workdir, reporting.CURVES_FILE))

  def close(self) -> None:
    self.tb.close()


def preempted(exp: experiment.Experiment, ckpts: checkpoints.Checkpoints, guard: preemption.Guard,
              epoch: int, step: int) -> Preempted:
  """The exception that ends a run stopped by a signal after its checkpoint of (epoch, step) was saved; waits
  until that save (asynchronous) is on disk."""
  ckpts.wait()
  spe = exp.steps_per_epoch
  ckpt = (epoch - 1) * spe + step
  where = f'before epoch {epoch}' if step == 0 else f'after step {step} of {spe} of epoch {epoch}'
  return Preempted(
      f'Stopped by {guard.signal_name or "request"} {where}; the state is saved in '
      f'{os.path.join(ckpts.managers["latest"].directory, str(ckpt))}. Run the same command again '
      f'(same config and --workdir={exp.workdir}) to resume from there: the run then ends as an '
      'uninterrupted one would.', epoch=epoch, step=step, checkpoint_step=ckpt)


def train(exp: experiment.Experiment, ckpts: checkpoints.Checkpoints, writers: Writers,
          guard: preemption.Guard):
  """Trains until the policy stops, resuming from the workdir's latest checkpoint; returns the replicated
  final state."""
  restored = ckpts.restore('latest', exp.template())
  if restored is None:
    state = loop.replicate(exp.initial_state())
    exp.compile_ahead(state)
    val = exp.measure(state, 0, attack=False, desc='initial validation')
    pstate, _ = exp.policy.init(val)
    epoch, done, position = 0, False, None
    writers.truncate(-1)
    probe = None
    if exp.lr0_probe is not None:  # lr0='auto': the probe picks lr0 and trains the start of epoch 1
      probe = lr_probe.run(exp, state, pstate, guard)
      state, position, pstate = probe.state, probe.position, pstate._replace(lr=probe.lr)
    writers.epoch({'epoch': 0, 'lr': pstate.lr, 'l1': pstate.l1, 'l2': pstate.l2,
                   'val_clean_adv': val['clean_adv'], 'val_clean_nat': val['clean_nat'],
                   **{k: val[k] for k in ('train_split_clean_nat',) if k in val},
                   **({'lr0_probe': probe.summary} if probe else {})})
  else:
    host_state, meta = restored
    state = loop.replicate(host_state)
    exp.compile_ahead(state)
    pstate = policy.from_dict(meta['policy'])
    epoch, done = meta['epoch'], meta['done']
    position = meta.get('position')  # where a preempted epoch stopped
    writers.truncate(epoch)
    log.info('Resuming after epoch %d%s from %s', epoch, f', step {position["step"]} of epoch '
             f'{position["epoch"]}' if position else '', ckpts.managers['latest'].directory)
  state = steps.set_loss_scalars(steps.set_learning_rate(state, pstate.lr), pstate.l1, pstate.l2)
  spe = exp.steps_per_epoch
  val_attacks = evaluation.validation_attacks(exp)  # config.eval.val_attacks: recorded, not followed

  def latest_meta(epoch, done, position=None):
    meta = {'epoch': epoch, 'done': done, 'policy': policy.to_dict(pstate), 'l1': pstate.l1, 'l2': pstate.l2,
            'seed': exp.seed, **exp.checkpoint_meta()}
    return {**meta, 'position': position} if position else meta

  while not done:
    epoch += 1
    lr, l1, l2 = pstate.lr, pstate.l1, pstate.l2
    start_step, carry = (position['step'], position['carry']) if position else (0, None)
    position = None
    state, train_metrics, report = loop.train_epoch(
        exp.p_train_step, state, exp.data.train_batches(epoch, exp.batch_size, start_step),
        seed=exp.seed, epoch=epoch, steps=spe, global_batch=exp.batch_size, progress=exp.progress,
        desc=f'epoch {epoch}', start_step=start_step, carry=carry, metrics_every=exp.metrics_every,
        prefetch=exp.prefetch,
        on_step=lambda _, step, e=epoch: guard.should_stop(preemption.position_id(e, step + 1, spe)))
    if report.stopped_at is not None:  # preempted: save the position inside the epoch, then stop
      stopped = report.stopped_at
      position = {'epoch': epoch, 'step': stopped, 'carry': report.carry}
      ckpts.save('latest', (epoch - 1) * spe + stopped, checkpoints.host_copy(state, True),
                 latest_meta(epoch - 1, False, position))
      raise preempted(exp, ckpts, guard, epoch, stopped)
    val = exp.measure(state, epoch, desc=f'validation {epoch}')
    pstate, decision = exp.policy.update(pstate, epoch, val)
    val_extra = evaluation.validation_record(val_attacks, state, epoch)  # the epoch's weights, before a reload
    if decision.new_best:
      exp.save_best(ckpts, state, epoch, val)
    reload_failed = False
    if decision.reload_best:
      state, best_meta = exp.restore_best(ckpts, state, f'The run keeps the weights of epoch {epoch} instead of '
                                          f'reloading those of epoch {decision.best_epoch}, and goes on.')
      reload_failed = best_meta is None
    record = {'epoch': epoch, 'lr': lr, 'l1': l1, 'l2': l2,
              **{f'train_{k}': v for k, v in train_metrics.items()},
              'train_seconds': report.seconds, 'images_per_second': report.images_per_second,
              'val_clean_adv': val['clean_adv'], 'val_clean_nat': val['clean_nat'], 'val_pgd10': val['pgd'],
              **val_extra, **{k: val[k] for k in ('train_split_clean_nat',) if k in val},
              'new_best': decision.new_best, 'best_epoch': decision.best_epoch,
              'reload_best': decision.reload_best, 'condition': decision.condition,
              'next_lr': decision.lr, 'stop': decision.stop, **({'reload_failed': True} if reload_failed else {})}
    state = steps.set_loss_scalars(steps.set_learning_rate(state, decision.lr), decision.l1, decision.l2)
    done = decision.stop
    # The log line first, then the checkpoint: a run that dies between the two resumes from the previous
    # checkpoint, drops this line and writes it again.
    writers.epoch(record)
    ckpts.save('latest', epoch * spe, checkpoints.host_copy(state, True), latest_meta(epoch, done))
    log.info(
        'epoch %d: lr %.2e l1 %.3f l2 %.3f | train loss %.4f, %.0f img/s | val clean %.4f (nat %.4f), '
        'PGD-10 %.4f%s%s%s', epoch, lr, record['l1'], record['l2'], train_metrics.get('loss', float('nan')),
        report.images_per_second, val['clean_adv'], val['clean_nat'], val['pgd'],
        ''.join(f', {k[4:]} {v:.4f}' for k, v in val_extra.items()),
        ' (best)' if decision.new_best else '',
        f' -> lr {decision.lr:.2e}, best of epoch {decision.best_epoch} reloaded (condition '
        f'{decision.condition})' if decision.reload_best else '')
    if not done and guard.should_stop(preemption.position_id(epoch, spe + 1, spe)):
      raise preempted(exp, ckpts, guard, epoch + 1, 0)
  return state


def train_and_evaluate(config, workdir: str, overwrite: bool = False, command: Optional[str] = None) -> dict:
  """Runs robust fine-tuning (config.method) as `config` describes, in (or resuming from) `workdir`.

  A multi-process run initialises jax.distributed first (autolora_jax.distributed). A workdir holding a run
  of another config is refused unless `overwrite` (which moves that run to workdir/replaced/<time>/); bad
  input found at start-up leaves the workdir as it was (autolora_jax.workdir). SIGTERM/SIGINT stop after the
  current step with a checkpoint and raise errors.Preempted (autolora_jax.preemption); during the test at the
  end, after the current AutoAttack batch, its progress kept for the restart (autolora_jax.eval_progress).

  `command`: the command line that started the run (run.py and autolora-train pass theirs), recorded in
  results.json and the card results.md. Returns the results dict written to workdir/results.json.
  """
  start = time.time()
  experiment.start(config)
  claimed = workdirs.claim(workdir, config, overwrite=overwrite)
  exp = ckpts = writers = None
  try:
    exp = experiment.Experiment(config, prepare_workdir(claimed.path))
    ckpts = checkpoints.Checkpoints(exp.workdir)
    writers = Writers(exp.workdir, exp.is_chief, exp.tensorboard, exp.plot_every)
    guard = preemption.Guard()  # SIGTERM/SIGINT stop after a step (in the test: after an AutoAttack batch)
    with guard:
      final_state = train(exp, ckpts, writers, guard)
      results = evaluation.test(exp, ckpts, final_state, command=command, guard=guard)
    probe = lr_probe.read(exp.workdir) if exp.lr0_probe is not None else None
    if probe and 'pick' in probe:
      results['lr0_probe'] = lr_probe.summary_of(probe)
    results['wall_seconds'] = time.time() - start
    if exp.is_chief:
      reporting.write_results(exp.workdir, results)
    return results
  except InputError:
    _close(exp, ckpts, writers)
    exp = ckpts = writers = None
    claimed.rollback()  # bad input found at start-up: leave the workdir as it was
    raise
  finally:
    _close(exp, ckpts, writers)


def _close(*parts) -> None:
  for part in parts:
    if part is not None:
      part.close()
