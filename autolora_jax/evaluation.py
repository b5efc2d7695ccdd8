"""Test-split evaluation beyond clean and PGD-10: AutoAttack, and the evaluation of a finished workdir.

* `test(exp, ckpts, final_state)`: the end of every run: clean, PGD-10 and AutoAttack test accuracy of the
  best and the final checkpoint into results.json.
* `AutoAttackEvaluation`: AutoAttack (experiment.AutoAttackSettings: version, norm, `num_points` test
  points (a class-stratified seeded sample, sampling.sample_points), batch size, seed; eps = the run's PGD
  eps unless autoattack.eps says otherwise, 0.0314 under reference_compat) on the deployed model of a
  checkpoint (the adversarial branch; W + dW for a method that deploys it, `Method.deployed_branch`);
  `add` writes its accuracy into a results entry beside "clean" and "pgd10", and the clean and PGD-10
  accuracy on the same points beside them.
* `evaluate_workdir(config, workdir)`: `run.py --mode=eval`: restores the best and the latest checkpoint of
  a workdir written by an earlier training run and evaluates both on the test split (clean, PGD-10, AA)
  into results.json, keeping what the training run wrote there.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import time
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from autolora_jax import (
  autoattack,
  checkpoints,
  corruptions,
  eval_progress,
  experiment,
  loop,
  preemption,
  reporting,
  sampling,
)
from autolora_jax.data.core import to_unit
from autolora_jax.errors import CheckpointError, DamagedCheckpointError, InputError, WorkdirError

log = logging.getLogger(__name__)


def input_shape(data, global_batch: int) -> list:
  """[C, H, W] of the images of a data set's test split, as the model is given them."""
  batch = next(iter(data.eval_batches('test', global_batch)))
  h, w, c = np.shape(batch['image'])[1:]
  return [int(c), int(h), int(w)]


@functools.lru_cache(maxsize=None)
def deployed_logits(model, branch: str = 'adv'):
  """`f(variables, x) -> logits` of the deployed branch (`Method.deployed_branch`: 'adv' but for a method
  that deploys W + dW) in inference mode: one function object per model and branch, so that AutoAttack
  compiles once for all checkpoints (and evaluations) of the same model."""
  return lambda variables, x: model.apply(variables, x, branch=branch, train=False)


def adversarial_logits(model):
  """`deployed_logits` of the adversarial branch, the deployed model of every built-in method but lora_at."""
  return deployed_logits(model, 'adv')


def _global_sum(values) -> list:
  """Sums a small vector of counts over processes (a no-op on one process); Python ints, JSON-ready."""
  values = np.asarray(values, np.int32)  # gathered through JAX, which keeps 32-bit types by default
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    values = np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)
  return [int(v) for v in values]


class AutoAttackEvaluation:
  """AutoAttack of a run's checkpoints on `settings.num_points` points (`indices`) of the test split (or of
  `split`)."""

  def __init__(self, settings, model, data, eval_batch_size: int, *, progress: bool = False,
               branch: str = 'adv', split: str = 'test'):
    self.split = split
    self.enabled = bool(settings.enabled)
    self.version = settings.version
    self.batch_size = int(settings.batch_size)
    self.seed = int(settings.seed)
    self.eps = float(settings.eps)
    self.norm = str(settings.norm)
    self.attacks = tuple(settings.attacks) if self.version == 'custom' else None
    self.num_test = data.num_examples(split)
    self.num_points = self.num_test if settings.num_points == 0 else min(int(settings.num_points), self.num_test)
    self.how = str(settings.points)
    self.progress = progress
    self._data = data
    self._eval_batch = int(eval_batch_size)
    self._points = None
    self._indices = None
    self._raw = None
    self.seconds: Dict[str, float] = {}
    self._apply = deployed_logits(model, branch)

  def indices(self) -> np.ndarray:
    """The attacked points' positions in the split (all processes'), sorted: `sampling.sample_points`."""
    if self._indices is None:
      self._indices = sampling.sample_points(self._data.labels(self.split), self.num_points, self.seed, self.how)
    return self._indices

  def points(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, their indices in the test split): this process's share of the attacked points."""
    if self._points is None:
      images, labels, index = self._sample()
      self._points = to_unit(images), labels, index
    return self._points

  def batches(self, global_batch: int):
    """The attacked points as masked evaluation batches (this process's rows, the images as the data set
    gives them), for the clean and PGD-10 accuracy on the same points."""
    images, labels, _ = self._sample()
    return sampling.point_batches(images, labels, len(self.indices()), global_batch)

  def _sample(self):
    if self._raw is None:
      self._raw = sampling.sample_of(self._data, self.split, self.indices())
    return self._raw

  def attack(self, variables: dict, desc: str = 'AA', resume=None, on_progress=None) -> autoattack.AutoAttackResult:
    """AutoAttack of the deployed branch with `variables` = {'params', 'batch_stats'} (host arrays);
    resume, on_progress: `autoattack.run`'s (eval_progress.TestProgress.autoattack makes them)."""
    x, y, index = self.points()  # keys from the points' indices in the split: any process count, same draws
    logits_fn = jax.tree_util.Partial(self._apply, variables)
    return autoattack.run(logits_fn, x, y, eps=self.eps, norm=self.norm, version=self.version, seed=self.seed,
                          batch_size=self.batch_size, attacks=self.attacks, point_index=index, progress=self.progress,
                          desc=desc, resume=resume, on_progress=on_progress)

  def add(self, entry: dict, state, name: str, replicated: bool = True, keeper=None) -> Optional[dict]:
    """Runs AA on a checkpoint's state and writes entry['test']['autoattack'] (robust accuracy, a fraction)
    and entry['autoattack'] (accuracy after each attack, points broken by each); returns the latter (None
    when disabled). The wall time goes to `summary()`, so that entries of identical runs compare equal.
    keeper: an eval_progress.TestProgress, which saves the progress and resumes it (None: neither)."""
    if not self.enabled:
      return None
    variables = checkpoints.host_copy({'params': state.params, 'batch_stats': state.batch_stats}, replicated)
    result = self.attack(variables, desc=f'AA ({name})', **(keeper.autoattack(name, self) if keeper else {}))
    counts = _global_sum([result.num_points, int(result.clean.sum()), int(result.robust.sum())]
                         + [int(np.sum(result.fell_to == a)) for a in result.attacks])
    total = counts[0]
    summary = result.summary()
    if jax.process_count() > 1:  # the numbers of all processes' points, not only this one's
      still = np.cumsum([counts[1]] + [-c for c in counts[3:]])  # robust after clean, then after each attack
      after = {stage: int(n) / total for stage, n in zip(('clean',) + tuple(result.attacks), still)}
      summary.update(num_points=int(total), clean=counts[1] / total, robust=counts[2] / total,
                     accuracy_after=after, broken_by={a: int(c) for a, c in zip(result.attacks, counts[3:])})
    for key in ('version', 'norm', 'attacks', 'eps', 'seed', 'seconds', 'settings'):
      summary.pop(key)
    self.seconds[name] = float(sum(result.seconds.values()))
    entry['test']['autoattack'] = float(counts[2] / total) if total else float('nan')
    entry['autoattack'] = summary
    return summary

  def accuracy_after(self, variables: dict, desc: str = 'AA') -> Dict[str, float]:
    """The robust accuracy (a fraction of all processes' points) after each attack of the cascade, by attack
    name, of the deployed branch with `variables` (host arrays)."""
    result = self.attack(variables, desc=desc)
    counts = _global_sum([result.num_points, int(result.clean.sum())]
                         + [int(np.sum(result.fell_to == a)) for a in result.attacks])
    still = np.cumsum([counts[1]] + [-c for c in counts[2:]])[1:]
    return {a: int(n) / max(counts[0], 1) for a, n in zip(result.attacks, still)}

  def summary(self) -> Dict[str, dict]:
    """The settings, for results.json's top level: {'autoattack': {...}} (empty when disabled)."""
    if not self.enabled:
      return {}
    attacks = self.attacks or autoattack.version_attacks(self.version, self.norm)
    return {'autoattack': {'version': self.version, 'norm': self.norm, 'attacks': list(attacks),
                           'eps': self.eps, 'num_points': self.num_points, 'num_test': self.num_test,
                           'points': self.how if self.num_points < self.num_test else 'all',
                           'indices': [int(i) for i in self.indices()] if self.num_points < self.num_test
                           else None, 'seed': self.seed, 'seconds': dict(self.seconds)}}

  def describe(self) -> str:
    """One line for under the results table."""
    if not self.enabled:
      return 'autoattack: disabled (config.autoattack.enabled=False)'
    if self.num_points >= self.num_test:
      where = f'on all {self.num_test} test points'
    elif self.how == 'stratified':
      where = (f'on {self.num_points} of {self.num_test} test points, a class-stratified sample (seed {self.seed}; '
               'clean and pgd10 on all, *_autoattack_points on the same sample)')
    else:
      where = (f'on the first {self.num_points} of {self.num_test} test points (clean and pgd10 on all, '
               '*_autoattack_points on the same points)')
    return f'autoattack: version {self.version}, {self.norm} eps {self.eps:.4f}, {where}'


def validation_attacks(exp) -> Optional[AutoAttackEvaluation]:
  """`config.eval.val_attacks` (exp.val_attacks) as an AutoAttack of the whole validation split with the
  run's AutoAttack eps, norm, batch and seed (`accuracy_after`); None when there are none."""
  if not exp.val_attacks:
    return None
  settings = exp.autoattack._replace(enabled=True, version='custom', attacks=tuple(exp.val_attacks), num_points=0)
  return AutoAttackEvaluation(settings, exp.model, exp.data, exp.eval_batch_size, progress=exp.progress,
                              branch=exp.method_def.deployed_branch, split='validation')


def validation_record(evaluation: Optional[AutoAttackEvaluation], state, epoch: int) -> Dict[str, float]:
  """metrics.jsonl's val_<attack> entries (e.g. val_apgd_ce) of a replicated state; {} without attacks."""
  if evaluation is None:
    return {}
  variables = checkpoints.host_copy({'params': state.params, 'batch_stats': state.batch_stats}, True)
  after = evaluation.accuracy_after(variables, desc=f'validation {epoch}: AA')
  return {f'val_{name.replace("-", "_")}': value for name, value in after.items()}


def test(exp, ckpts: checkpoints.Checkpoints, final_state, command: Optional[str] = None, guard=None) -> dict:
  """Test accuracies (clean, PGD-10, AutoAttack) of the best and the final checkpoint of an
  `experiment.Experiment`; writes results.json and results.md (process 0). `command`: the command line that
  made the run, for the card. `guard`: the run's preemption.Guard: a SIGTERM stops after the AutoAttack
  batch it comes in, and the same command resumes there (eval_progress: what is kept in WORKDIR/eval_state)."""
  results = {'method': exp.method, 'reference_compat': exp.reference_compat, 'dataset': exp.dataset_name,
             'arch': exp.arch, 'num_test': exp.data.num_examples('test'), 'input_shape': input_shape(exp.data, exp.eval_batch_size)}
  results['threat_model'] = {'norm': exp.attack.norm, 'eps': exp.attack.eps, 'step_size': exp.attack.step_size,
                             'eval_steps': exp.attack.eval_steps}
  if command:
    results['command'] = command
  results.update(exp.method_def.results(exp.settings))  # the method's own, e.g. TWINS's loss, lam, beta
  aa = AutoAttackEvaluation(exp.autoattack, exp.model, exp.data, exp.eval_batch_size, progress=exp.progress,
                            branch=exp.method_def.deployed_branch)
  final_meta = ckpts.restore_meta('latest')
  keeper = eval_progress.TestProgress.of(exp, ckpts, final_meta, guard)  # what a stopped evaluation kept
  keeper.check('before the test evaluation')
  for name in ('best', 'final'):
    if name == 'best':
      state, meta = exp.restore_best(ckpts, final_state, f'The test evaluates the final state (epoch '
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
    finished = keeper.finished(name, epoch, state)  # evaluated before a stop: not again
    if finished is not None:
      results[name] = finished['entry']
      results.update(finished.get('top_level') or {})  # e.g. the corruptions' settings and times
      if finished.get('aa_seconds') is not None:
        aa.seconds[name] = finished['aa_seconds']
      continue
    acc = exp.evaluate(state, 'test', desc=f'test ({name})')
    results[name] = {'epoch': epoch, 'test': {'clean': acc['clean_adv'], 'pgd10': acc['pgd'],
                                              'clean_nat_branch': acc['clean_nat']}}
    if aa.enabled and aa.num_points < aa.num_test:  # PGD-10 on AutoAttack's points, to compare the two
      gb = exp.eval_batch_size
      sub = loop.evaluate(exp.p_eval_step, state, aa.batches(gb), total=aa.num_points, global_batch=gb)
      results[name]['test']['clean_autoattack_points'] = sub['clean_adv']
      results[name]['test']['pgd10_autoattack_points'] = sub['pgd']
    aa.add(results[name], state, name, keeper=keeper)
    corruptions.evaluate(exp, results, name, state)  # config.eval.corruptions (off by default)
    keeper.record(name, results[name], aa.seconds.get(name),
                  top_level={k: results[k] for k in ('corruptions',) if k in results})
  results.update(aa.summary())
  if exp.is_chief:
    corruptions.draw(exp, results)
    path = reporting.write_results(exp.workdir, results)
    print('\nTest accuracy (' + exp.dataset_name + f', {results["num_test"]} examples):')
    print(reporting.results_table(results))
    print(aa.describe())
    print(f'Written to {path}')
  keeper.done()  # results.json holds it all now
  return results


def read_results(workdir: str) -> dict:
  """workdir/results.json ({} if the run has written none)."""
  path = os.path.join(workdir, reporting.RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def evaluate_workdir(config, workdir: str) -> dict:
  """`--mode=eval`: test evaluation (clean, PGD-10, AutoAttack) of the best and the latest checkpoint of a
  workdir that a training run wrote; returns the results dict merged into workdir/results.json.

  Every variable comes from the workdir's checkpoints, the model's input normalisation from their metadata:
  the pre-trained FE (config.pretrained, or the in-process pre-training) is not read again.
  """
  path = os.path.abspath(os.path.expanduser(workdir or ''))
  if not workdir or not os.path.isdir(os.path.join(path, 'checkpoints', 'latest')):
    raise WorkdirError(f'--mode=eval needs a workdir with a training run in it; {path} has no '
                       'checkpoints/latest. Train first (--mode=train, the default) or point --workdir at '
                       'the folder of a finished run.')
  start = time.time()
  experiment.start(config)
  ckpts = checkpoints.Checkpoints(path)
  exp = None
  try:
    newest = ckpts.latest_step()
    try:  # the newest checkpoint only, and nothing moved aside (that is for --mode=train)
      meta = ckpts.restore_meta('latest', step=newest) if newest is not None else None
      normalization = experiment.normalization_of(meta)
      # A checkpoint without the normalisation (format version 1, see compat): the pre-trained file's.
      exp = experiment.Experiment(config, path, normalization=normalization, load_fe=normalization is None)
      restored = ckpts.restore('latest', exp.template(), step=newest) if newest is not None else None
    except DamagedCheckpointError as e:  # not a mismatch: the files cannot be read
      raise CheckpointError(
          f'{e} --mode=eval evaluates the newest checkpoint only. Run the same command with --mode=train: it '
          'moves the damaged checkpoint aside (kept), resumes from the newest intact one, trains the epochs '
          'after it again and evaluates.') from None
    except InputError:  # e.g. stored shapes that do not fit this config, or bad data: the message says so
      raise
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f'The checkpoint in {path} does not fit this config ({type(e).__name__}: {str(e)[:200]}). Pass the '
          f'config the run was trained with (see {os.path.join(path, "config.json")}).') from None
    if restored is None or ckpts.latest_step('best') is None:
      raise CheckpointError(f'{path} holds no complete training checkpoint (latest and best): train first.')
    host_state, meta = restored
    if not meta.get('done', False):
      log.warning('The run in %s has not finished (last epoch %s): evaluating its latest state as "final".',
                  path, meta.get('epoch'))
    previous = read_results(path) if exp.is_chief else {}
    with preemption.Guard() as guard:  # SIGTERM/SIGINT: stop after an AutoAttack batch, resumable
      results = test(exp, ckpts, loop.replicate(host_state), command=previous.get('command'),  # the training's
                     guard=guard)
    merged = {**previous, **results, 'eval_seconds': time.time() - start}
    if exp.is_chief:
      reporting.write_results(path, merged)
    return merged
  finally:
    ckpts.close()
    if exp is not None:
      exp.close()
