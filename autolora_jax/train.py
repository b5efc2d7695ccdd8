"""Robust fine-tuning: `train_and_evaluate(config, workdir)`, the one training loop of every method
(AutoLoRa, vanilla RFT, PGD-AT: `config.method`, see methods.py).

Per epoch: train (pmapped step over all local devices), validate (clean accuracy of both branches, PGD-10
robust accuracy of the adversarial branch), let the method's epoch policy (lr_policy.py: the automatic
learning rate and loss scalars, or fixed ones) set the next epoch's lr and scalars, keep the best
checkpoint, reload it when the policy says so, save the latest state, log. At the end: test accuracy
(clean, PGD-10, AutoAttack) of the best and of the final checkpoint into results.json.

Starting it again on the same workdir resumes after the last completed epoch, or at the step where a
SIGTERM/SIGINT stopped it, and ends with the same result as an uninterrupted run (the data order and every
random draw are functions of seed, epoch, step). It resumes from the newest checkpoint that can be read: a
damaged one is moved aside and kept (checkpoints.py), and the epochs after the intact one are trained again.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Optional

import jax

from autolora_jax import (checkpoints, config_checks, distributed, evaluation, input_pipeline, loop,
                          lr_policy, methods, preemption, pretrain, reporting, steps)
from autolora_jax import workdir as workdirs
from autolora_jax.errors import ConfigError, DataError, InputError, Preempted, WorkdirError

log = logging.getLogger(__name__)


def prepare_workdir(workdir: str) -> str:
  """Creates the workdir if needed and checks that it can be written; returns its absolute path."""
  if not workdir:
    raise WorkdirError('No workdir given: pass --workdir=DIR, the folder for checkpoints, logs and results.')
  path = os.path.abspath(os.path.expanduser(workdir))
  workdirs.check_writable(path)
  return path


class Run:
  """Everything one fine-tuning run holds: data, model, compiled steps, checkpoints, writers."""

  def __init__(self, config, workdir: str):
    config_checks.validate(config)
    config_checks.check_devices(config, jax.device_count(), jax.process_count())
    self.config = config
    self.is_chief = jax.process_index() == 0
    self.workdir = prepare_workdir(workdir)
    self.progress = bool(config.progress) and self.is_chief
    self.data = input_pipeline.create_dataset(config.dataset, seed=config.seed,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count(),
                                              reference_compat=config.reference_compat)
    self.steps_per_epoch = self.data.steps_per_epoch(config.batch_size)
    if self.steps_per_epoch < 1:
      raise DataError(f'The training split of {config.dataset.name} has {self.data.num_examples("train")} '
                      f'examples, fewer than one batch of config.batch_size={config.batch_size}: lower the '
                      'batch size.')
    if self.data.num_examples('validation') < 1:
      raise ConfigError(f'config.dataset.val_fraction={config.dataset.val_fraction} leaves no validation '
                        'example: the schedule and the loss scalars need one. Raise it.')
    if config.pretrain.epochs > 0:  # its data loads later, after the model: check its classes now
      input_pipeline.check_class_selection(config.pretrain.dataset, key='config.pretrain.dataset')
    # Read before the model is built: a bad checkpoint fails early, and its input normalisation becomes
    # config.model.mean/std.
    self.pretrained = pretrain.load_pretrained(config)
    self.model = methods.create_model(config, self.data.num_classes)  # no LoRa for the baselines
    self.tx = steps.make_optimizer(config.auto_lr.lr0, config.optim.momentum, config.optim.weight_decay)
    self.policy = lr_policy.create(config)  # lr, scalars, best checkpoint and stop, per method
    self.ckpts = checkpoints.Checkpoints(self.workdir)
    self.attack = a = methods.attack_settings(config)  # reference_compat: eps 0.0314
    self.kl_denominator = methods.kl_denominator(config, jax.device_count())
    self.p_train_step = loop.pmap_train_step(steps.make_train_step(
        self.model, method=config.method, eps=a.eps, step_size=a.step_size, steps=a.train_steps,
        kl_denominator=self.kl_denominator))
    self.p_eval_step = loop.pmap_eval_step(steps.make_eval_step(
        self.model, eps=a.eps, step_size=a.step_size, steps=a.eval_steps))
    self.p_eval_clean = loop.pmap_eval_step(steps.make_eval_step(
        self.model, eps=a.eps, step_size=a.step_size, steps=a.eval_steps, attack=False))
    self.log = reporting.MetricsLog(self.workdir)
    self.tb = reporting.TensorBoard(self.workdir, enabled=config.tensorboard and self.is_chief)
    self.guard = preemption.Guard()  # train_and_evaluate enters it: SIGTERM/SIGINT stop after a step

  # -- state -------------------------------------------------------------------------------------------

  def template(self) -> steps.TrainState:
    """An unreplicated TrainState with fresh variables (the shape Orbax restores into); made once."""
    if getattr(self, '_template', None) is None:  # initialising compiles a program: do it once per run
      variables = pretrain.init_variables(self.model, self.config.model.input_size, self.config.seed)
      self._template = steps.create_train_state(self.model, variables, self.tx)
    return self._template

  def initial_state(self) -> steps.TrainState:
    """Fresh fine-tuning variables with the pre-trained FE transplanted in (if the config gives one)."""
    state = self.template()
    fe = pretrain.feature_extractor(self.config, self.workdir, progress=self.progress,
                                    pretrained=self.pretrained)
    self.pretrained = None  # copied into the state below; free the host copy
    if fe is not None:
      variables, report = pretrain.transplant(fe, {'params': state.params, 'batch_stats': state.batch_stats})
      log.info('Pre-trained FE: %d arrays copied; not used: %s', report['copied'], report['unused'])
      state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
    return state

  def evaluate(self, state, split: str, attack: bool = True, desc: Optional[str] = None) -> dict:
    """Accuracies (fractions) of a replicated state on a split: clean_adv, clean_nat and, with attack, pgd."""
    gb = self.config.eval_batch_size
    return loop.evaluate(self.p_eval_step if attack else self.p_eval_clean, state,
                         self.data.eval_batches(split, gb), total=self.data.num_examples(split),
                         global_batch=gb, progress=self.progress, desc=desc or split)

  def measure(self, state, epoch: int, attack: bool = True, desc: str = 'validation') -> dict:
    """The validation accuracies the policy decides on; with `policy.needs_train_accuracy` (reference_compat,
    item 2) also 'train_split_clean_nat': the natural branch on the augmented training split."""
    val = self.evaluate(state, 'validation', attack=attack, desc=desc)
    if self.policy.needs_train_accuracy:
      c = self.config
      gb = methods.train_split_batch_size(self.data.num_examples('train'), c.eval_batch_size, c.batch_size)
      acc = loop.evaluate(self.p_eval_clean, state, methods.train_split_batches(self.data, epoch, gb),
                          total=self.data.steps_per_epoch(gb) * gb, global_batch=gb, progress=self.progress,
                          desc=f'{desc}: training split')
      val['train_split_clean_nat'] = acc['clean_nat']
    return val

  def save_best(self, state, epoch: int, val: dict) -> None:
    variables = checkpoints.host_copy({'params': state.params, 'batch_stats': state.batch_stats}, True)
    self.ckpts.save('best', epoch, variables, {'epoch': epoch, 'val': val})

  def restore_best(self, state, if_lost: str):
    """Replaces params and BN statistics of a replicated state by the best checkpoint's (the optimizer
    state stays); returns (state, best metadata). A best checkpoint that cannot be read is moved aside with
    a warning that ends in `if_lost` (what the caller does instead); then (state unchanged, None)."""
    template = checkpoints.host_copy({'params': state.params, 'batch_stats': state.batch_stats}, True)
    restored = self.ckpts.restore('best', template, if_lost=if_lost)
    if restored is None:
      return state, None
    variables = loop.replicate(restored[0])
    return state.replace(params=variables['params'], batch_stats=variables['batch_stats']), restored[1]

  def compile_ahead(self, state) -> None:
    """Multi-process: compiles the train and eval steps on every process before any of them runs."""
    if jax.process_count() == 1:
      return
    train_batch = loop.shard(next(self.data.train_batches(1, self.config.batch_size)))
    eval_batch = loop.shard(next(self.data.eval_batches('validation', self.config.eval_batch_size)))
    distributed.compile_ahead([(self.p_train_step, (state, train_batch, loop.step_rng(0, 1, 0))),
                               (self.p_eval_step, (state, eval_batch)),
                               (self.p_eval_clean, (state, eval_batch))])

  # -- the loop ----------------------------------------------------------------------------------------

  def write_epoch(self, record: dict) -> None:
    if not self.is_chief:
      return
    self.log.append(record)
    self.tb.scalars(record['epoch'], {k: v for k, v in record.items() if k != 'epoch'})
    reporting.plot_curves(self.log.read(), os.path.join(self.workdir, reporting.CURVES_FILE))

  def train(self):
    """Trains until the schedule stops; returns the replicated final state."""
    config = self.config
    restored = self.ckpts.restore('latest', self.template())
    if restored is None:
      state = loop.replicate(self.initial_state())
      self.compile_ahead(state)
      val = self.measure(state, 0, attack=False, desc='initial validation')
      pstate, _ = self.policy.start(val)
      epoch, done, position = 0, False, None
      if self.is_chief:
        self.log.truncate(-1)
        self.write_epoch({'epoch': 0, 'lr': pstate.lr, 'l1': pstate.l1, 'l2': pstate.l2,
                          'val_clean_adv': val['clean_adv'], 'val_clean_nat': val['clean_nat'],
                          **{k: val[k] for k in ('train_split_clean_nat',) if k in val}})
    else:
      host_state, meta = restored
      state = loop.replicate(host_state)
      self.compile_ahead(state)
      pstate = lr_policy.PolicyState.from_dict(meta['policy'])
      epoch, done = meta['epoch'], meta['done']
      position = meta.get('position')  # where a preempted epoch stopped
      if self.is_chief:
        self.log.truncate(epoch)
      log.info('Resuming after epoch %d%s from %s', epoch, f', step {position["step"]} of epoch '
               f'{position["epoch"]}' if position else '', self.ckpts.managers['latest'].directory)
    state = steps.set_loss_scalars(steps.set_learning_rate(state, pstate.lr), pstate.l1, pstate.l2)
    spe = self.steps_per_epoch

    def latest_meta(epoch, done, position=None):
      meta = {'epoch': epoch, 'done': done, 'policy': pstate.to_dict(), 'l1': pstate.l1, 'l2': pstate.l2,
              'seed': config.seed}
      return {**meta, 'position': position} if position else meta

    while not done:
      epoch += 1
      lr, l1, l2 = pstate.lr, pstate.l1, pstate.l2
      start_step, carry = (position['step'], position['carry']) if position else (0, None)
      position = None
      state, train_metrics, timing = loop.train_epoch(
          self.p_train_step, state, self.data.train_batches(epoch, config.batch_size, start_step),
          seed=config.seed, epoch=epoch, steps=spe, global_batch=config.batch_size, progress=self.progress,
          desc=f'epoch {epoch}', start_step=start_step, carry=carry,
          on_step=lambda _, step, e=epoch: self.guard.should_stop(preemption.position_id(e, step + 1, spe)))
      if timing['stopped_at'] is not None:  # preempted: save the position inside the epoch, then stop
        stopped = timing['stopped_at']
        position = {'epoch': epoch, 'step': stopped, 'carry': timing['carry']}
        self.ckpts.save('latest', (epoch - 1) * spe + stopped, checkpoints.host_copy(state, True),
                        latest_meta(epoch - 1, False, position))
        raise self.preempted(epoch, stopped)
      val = self.measure(state, epoch, desc=f'validation {epoch}')
      pstate, decision = self.policy.update(pstate, epoch, val)
      if decision.new_best:
        self.save_best(state, epoch, val)
      if decision.reload_best:
        state, _ = self.restore_best(state, f'The run keeps the weights of epoch {epoch} instead of '
                                     f'reloading those of epoch {decision.best_epoch}, and goes on.')
      record = {'epoch': epoch, 'lr': lr, 'l1': l1, 'l2': l2,
                **{f'train_{k}': v for k, v in train_metrics.items()},
                'train_seconds': timing['seconds'], 'images_per_second': timing['images_per_second'],
                'val_clean_adv': val['clean_adv'], 'val_clean_nat': val['clean_nat'], 'val_pgd10': val['pgd'],
                **{k: val[k] for k in ('train_split_clean_nat',) if k in val},
                'new_best': decision.new_best, 'best_epoch': decision.best_epoch,
                'reload_best': decision.reload_best, 'condition': decision.condition,
                'next_lr': decision.lr, 'stop': decision.stop}
      state = steps.set_loss_scalars(steps.set_learning_rate(state, decision.lr), decision.l1, decision.l2)
      done = decision.stop
      # The log line first, then the checkpoint: a run that dies between the two resumes from the previous
      # checkpoint, drops this line and writes it again.
      self.write_epoch(record)
      self.ckpts.save('latest', epoch * spe, checkpoints.host_copy(state, True), latest_meta(epoch, done))
      log.info(
          'epoch %d: lr %.2e l1 %.3f l2 %.3f | train loss %.4f, %.0f img/s | val clean %.4f (nat %.4f), '
          'PGD-10 %.4f%s%s', epoch, lr, record['l1'], record['l2'], train_metrics.get('loss', float('nan')),
          timing['images_per_second'], val['clean_adv'], val['clean_nat'], val['pgd'],
          ' (best)' if decision.new_best else '',
          f' -> lr {decision.lr:.2e}, best of epoch {decision.best_epoch} reloaded (condition '
          f'{decision.condition})' if decision.reload_best else '')
      if not done and self.guard.should_stop(preemption.position_id(epoch, spe + 1, spe)):
        raise self.preempted(epoch + 1, 0)
    return state

  def preempted(self, epoch: int, step: int) -> Preempted:
    """The exception that ends a run stopped by a signal after its checkpoint of (epoch, step) was saved."""
    ckpt = (epoch - 1) * self.steps_per_epoch + step
    where = (f'before epoch {epoch}' if step == 0 else
             f'after step {step} of {self.steps_per_epoch} of epoch {epoch}')
    return Preempted(
        f'Stopped by {self.guard.signal_name or "request"} {where}; the state is saved in '
        f'{os.path.join(self.ckpts.managers["latest"].directory, str(ckpt))}. Run the same command again '
        f'(same config and --workdir={self.workdir}) to resume from there: the run then ends as an '
        'uninterrupted one would.', epoch=epoch, step=step, checkpoint_step=ckpt)

  def test(self, final_state) -> dict:
    """Test accuracies (clean, PGD-10, AutoAttack) of the best and the final checkpoint; writes
    results.json (process 0)."""
    results = {'method': self.config.method, 'reference_compat': self.config.reference_compat,
               'dataset': self.config.dataset.name, 'num_test': self.data.num_examples('test')}
    aa = evaluation.AutoAttackEvaluation(self.config, self.model, self.data, progress=self.progress)
    final_meta = self.ckpts.restore_meta('latest')
    for name in ('best', 'final'):
      if name == 'best':
        state, meta = self.restore_best(final_state, f'The test evaluates the final state (epoch '
                                        f'{final_meta["epoch"]}) as "best" too (results.json: "best_lost").')
        epoch = final_meta['epoch'] if meta is None else meta['epoch']
        if meta is None:  # the best checkpoint cannot be read: "best" is the final state
          results['best_lost'] = True
      else:
        state, epoch = final_state, final_meta['epoch']
        if epoch == results['best']['epoch']:
          # The best checkpoint is the final state (same epoch): the same weights give the same numbers.
          results['final'] = {**copy.deepcopy(results['best']), 'same_as_best': True}
          continue
      acc = self.evaluate(state, 'test', desc=f'test ({name})')
      results[name] = {'epoch': epoch, 'test': {'clean': acc['clean_adv'], 'pgd10': acc['pgd'],
                                                'clean_nat_branch': acc['clean_nat']}}
      if aa.enabled and aa.num_points < aa.num_test:  # PGD-10 on AutoAttack's points, to compare the two
        gb = self.config.eval_batch_size
        points = evaluation.first_batches(self.data, 'test', aa.num_points, gb)
        sub = loop.evaluate(self.p_eval_step, state, points, total=aa.num_points, global_batch=gb)
        results[name]['test']['pgd10_autoattack_points'] = sub['pgd']
      aa.add(results[name], state, name)
    results.update(aa.summary())
    if self.is_chief:
      path = reporting.write_results(self.workdir, results)
      print('\nTest accuracy (' + self.config.dataset.name + f', {results["num_test"]} examples):')
      print(reporting.results_table(results))
      print(aa.describe())
      print(f'Written to {path}')
    return results

  def close(self) -> None:
    self.ckpts.close()
    if hasattr(self.data, 'close'):
      self.data.close()  # the decoding threads of the image data sets
    self.tb.close()


def train_and_evaluate(config, workdir: str, overwrite: bool = False) -> dict:
  """Runs robust fine-tuning (config.method) as `config` describes, in (or resuming from) `workdir`.

  A multi-process run initialises jax.distributed first (autolora_jax.distributed). A workdir holding a run
  of another config is refused unless `overwrite` (which moves that run to workdir/replaced/<time>/); bad
  input found at start-up leaves the workdir as it was (autolora_jax.workdir). SIGTERM/SIGINT stop after the
  current step with a checkpoint and raise errors.Preempted (autolora_jax.preemption).

  Returns the results dict written to workdir/results.json.
  """
  start = time.time()
  config_checks.validate(config)
  distributed.initialize(config)
  claimed = workdirs.claim(workdir, config, overwrite=overwrite)
  run = None
  try:
    run = Run(config, claimed.path)
    with run.guard:
      final_state = run.train()
    results = run.test(final_state)
    results['wall_seconds'] = time.time() - start
    if run.is_chief:
      reporting.write_results(run.workdir, results)
    return results
  except InputError:
    if run is not None:
      run.close()
      run = None
    claimed.rollback()  # bad input found at start-up: leave the workdir as it was
    raise
  finally:
    if run is not None:
      run.close()
