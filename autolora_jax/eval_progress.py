"""Resumable test evaluation (evaluation.test, `--mode=eval`): what a stopped evaluation keeps, and where it stops.

The progress lives in WORKDIR/eval_state/ while the test evaluation runs, and is removed once results.json
is written (results.json is then the only record):

* `partial_results.json` (process 0): per checkpoint ('best', 'final') whose evaluation finished (clean,
  PGD-10 and AutoAttack), its results entry, with the settings and the checkpoint's epoch and weights
  digest it was made with. A restart reuses the entry of a finished checkpoint instead of evaluating it
  again; the clean and PGD-10 passes of a checkpoint whose AutoAttack had not finished run again (they take
  a few percent of AutoAttack's time).
* `autoattack-<checkpoint>.npz` (multi-process: `autoattack-<checkpoint>-p<i>of<n>.npz`, one per process):
  the AutoAttack progress of that checkpoint, an `autoattack.CascadeState` (the position: stage, pass,
  the pass's points, the next batch; robust, fell_to, the adversarial examples of the points broken so far,
  the points each attack ran on, accuracies, seconds) and its fingerprint (settings, the attacked points,
  the checkpoint's epoch and weights digest). It is written with a temporary file and os.replace (a file
  is whole or absent), at most every SAVE_EVERY_S seconds and never more than SAVE_SHARE of the time (the
  broken points' images: from kilobytes up to hundreds of MB for a full test split of large images), and
  always when the evaluation stops. A restart with the same fingerprint resumes at the batch after the
  last one saved and ends with the uninterrupted result; any other (another seed, eps, norm, version,
  batch size, points, checkpoint, ...) starts that AutoAttack afresh and logs why.

A SIGTERM/SIGINT (the run's `preemption.Guard`) stops the evaluation after the AutoAttack batch it is in
(or, outside AutoAttack, at the next check: the start of the test, the end of a checkpoint's evaluation):
the progress is saved and `errors.Preempted` raised, with the same "run the same command again" message as
training. Multi-process: every process checks at the same numbered positions, one after another
(`Stopper`), so all stop at the same one; a pass's batch count differs between processes (their points
do), so at the start of every pass the processes agree on the largest count and each one checks that many
times in the pass, the ones without a batch left at its end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from autolora_jax import autoattack
from autolora_jax.autoattack.cascade import TARGETED, CascadeState
from autolora_jax.errors import Preempted

log = logging.getLogger(__name__)

STATE_DIR = 'eval_state'
PARTIAL_FILE = 'partial_results.json'
FORMAT = 1
SAVE_EVERY_S = 10.0  # the most often the AutoAttack progress is written (besides when stopping) ...
SAVE_SHARE = 0.05  # ... and the largest share of the time spent writing it


def weights_digest(variables) -> str:
  """A short SHA-256 of a tree of host arrays (paths, dtypes, shapes and bytes): the checkpoint's identity."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()[:20]


def points_digest(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> str:
  h = hashlib.sha256()
  for a in (np.asarray(index, np.int64), np.asarray(y, np.int64), np.asarray(x, np.float32)):
    h.update(f'{a.shape}|'.encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:20]


def _json_ready(tree):
  return json.loads(json.dumps(tree))


def _allgather(values) -> np.ndarray:
  """(process_count, k): every process's small int vector (one process: its own, as one row)."""
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values[None]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)


def _differences(saved: dict, current: dict) -> str:
  keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  return ', '.join(f'{k} ({saved.get(k)!r} then, {current.get(k)!r} now)' for k in keys)


def _atomic_write(path: str, write) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class Stopper:
  """Where the test evaluation may stop: numbered positions, one up per check, on from the last one the
  guard saw (training's), the same numbers on every process (`preemption.Guard.should_stop`)."""

  def __init__(self, guard):
    self.guard = guard
    self.position = (guard.position or 0) if guard is not None else 0
    self.multiprocess = guard is not None and guard.multiprocess

  def __call__(self) -> bool:
    if self.guard is None:
      return False
    self.position += 1
    return self.guard.should_stop(self.position)


class AutoAttackProgress:
  """`on_progress` of one checkpoint's AutoAttack: saves the state now and then, stops on request."""

  def __init__(self, keeper: 'TestProgress', name: str, fingerprint: dict, x: np.ndarray):
    self.keeper, self.name, self.fingerprint, self.x = keeper, name, _json_ready(fingerprint), x
    count = jax.process_count()
    file = f'autoattack-{name}.npz' if count == 1 else f'autoattack-{name}-p{jax.process_index()}of{count}.npz'
    self.path = os.path.join(keeper.folder, file)
    self._key: Optional[Tuple[int, int]] = None
    self._slot = self._slots = 0
    self._resumed_at: Optional[Tuple[Tuple[int, int], int]] = None
    self._last_save = time.time()
    self._save_seconds = 0.0

  # -- reading back --------------------------------------------------------------------------------------

  def _load(self) -> Tuple[Optional[Tuple[CascadeState, dict]], str]:
    """((state, meta), '') from the file, or (None, why not: '' when there is none)."""
    if not os.path.exists(self.path):
      return None, ''
    try:
      with np.load(self.path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
      meta = json.loads(str(arrays.pop('meta')))
    except Exception as e:  # pylint: disable=broad-except  # a damaged file: start afresh
      return None, f'it cannot be read ({type(e).__name__}: {str(e)[:120]})'
    if meta.get('fingerprint') != self.fingerprint:
      return None, f'it was made with other settings: {_differences(meta.get("fingerprint") or {}, self.fingerprint)}'
    try:
      x_adv = self.x.copy()
      x_adv[arrays['adv_index']] = arrays['adv']
      attacked = {a: arrays[f'attacked/{a}'] for a in meta['attacked']}
      state = CascadeState(tuple(meta['attacks']), int(meta['stage']), int(meta['pass_index']),
                           arrays['todo'].astype(np.int64), int(meta['start']), int(meta['batch_size']),
                           arrays['pred'], arrays['zero_grad'], int(meta['num_classes']), arrays['robust'],
                           arrays['fell_to'], x_adv, attacked, dict(meta['accuracy']), dict(meta['seconds']))
      int(meta['slot'])
    except (KeyError, ValueError, IndexError, TypeError) as e:
      return None, f'its contents do not fit the points ({type(e).__name__}: {str(e)[:120]})'
    if any(np.shape(a) != (self.x.shape[0],) for a in (state.pred, state.zero_grad, state.robust, state.fell_to)):
      return None, 'its arrays do not fit the points'
    return (state, meta), ''

  def resume(self) -> Optional[CascadeState]:
    """The saved state to resume from, if every process has one of these settings at the same position
    (None: start afresh; the file is then removed)."""
    loaded, why = self._load()
    position = [loaded[1]['stage'], loaded[1]['pass_index'], loaded[1]['slot']] if loaded else [-1, -1, -1]
    rows = _allgather([int(loaded is not None)] + position)
    if loaded is not None and not (rows[:, 0].all() and (rows[:, 1:] == rows[0, 1:]).all()):
      loaded, why = None, 'the other processes have no progress saved at the same position'
    if loaded is None:
      if why:
        log.info('AutoAttack of the %s checkpoint: starting afresh, not from %s: %s.', self.name, self.path, why)
      if os.path.exists(self.path):
        os.remove(self.path)
      return None
    state, meta = loaded
    self._resumed_at = ((state.stage, state.pass_index), int(meta['slot']))
    log.info('AutoAttack of the %s checkpoint: resuming from %s, %s.', self.name, self.path, self._where(state))
    return state

  # -- the callback --------------------------------------------------------------------------------------

  def __call__(self, state: CascadeState) -> None:
    stop = self.keeper.stopper
    key = (state.stage, state.pass_index)
    if key != self._key:  # a pass begins (or resumes): how many checks it gets, the same on every process
      self._key = key
      self._slot = self._resumed_at[1] if self._resumed_at is not None and self._resumed_at[0] == key else 0
      self._resumed_at = None
      local = -(-len(state.todo) // state.batch_size)
      self._slots = int(_allgather([local]).max()) if stop.multiprocess else local
    else:  # after a batch
      self._slot += 1
      if stop():
        self._stop(state)
    if state.pass_done and stop.multiprocess:
      while self._slot < self._slots:  # the batches other processes still run in this pass
        self._slot += 1
        if stop():
          self._stop(state)
    now = time.time()
    if now - self._last_save >= max(SAVE_EVERY_S, self._save_seconds / SAVE_SHARE):
      self.save(state)

  def save(self, state: CascadeState) -> None:
    start = time.time()
    os.makedirs(self.keeper.folder, exist_ok=True)
    broken = np.flatnonzero(np.isin(state.fell_to, state.attacks)).astype(np.int32)
    meta = {'format': FORMAT, 'fingerprint': self.fingerprint, 'attacks': list(state.attacks),
            'stage': int(state.stage), 'pass_index': int(state.pass_index), 'start': int(state.start),
            'slot': int(self._slot), 'batch_size': int(state.batch_size), 'num_classes': int(state.num_classes),
            'attacked': list(state.attacked), 'accuracy': state.accuracy, 'seconds': state.seconds,
            'saved': time.strftime('%Y-%m-%d %H:%M:%S')}
    arrays = {'todo': np.asarray(state.todo, np.int32), 'pred': state.pred, 'zero_grad': state.zero_grad,
              'robust': state.robust, 'fell_to': state.fell_to, 'adv_index': broken, 'adv': state.x_adv[broken],
              'meta': np.array(json.dumps(meta)),
              **{f'attacked/{a}': m for a, m in state.attacked.items()}}
    _atomic_write(self.path, lambda f: np.savez(f, **arrays))
    self._last_save = time.time()
    self._save_seconds = self._last_save - start

  def _where(self, state: CascadeState) -> str:
    done = -(-state.start // state.batch_size)
    total = -(-len(state.todo) // state.batch_size)
    if state.stage == 0:
      return f'after batch {done} of {total} of the clean pass'
    attack = state.attacks[state.stage - 1]
    kind = 'target' if attack in TARGETED else 'restart'
    return f'after batch {done} of {total} of {attack} ({kind} pass {state.pass_index + 1})'

  def _stop(self, state: CascadeState) -> None:
    self.save(state)
    epoch = self.fingerprint.get('epoch')
    raise self.keeper.preempted(f'in the AutoAttack of the {self.name} checkpoint'
                                f'{"" if epoch is None else f" (epoch {epoch})"}, {self._where(state)}')

  def clear(self) -> None:
    if os.path.exists(self.path):
      os.remove(self.path)


class TestProgress:
  """The progress of one test evaluation (`evaluation.test`): finished checkpoints' entries, AutoAttack
  states, and the checks where a SIGTERM stops it."""

  def __init__(self, workdir: str, settings: dict, *, guard=None, is_chief: bool = True, ckpts=None,
               epoch: int = 0):
    self.workdir, self.is_chief, self._ckpts = workdir, is_chief, ckpts
    self.folder = os.path.join(workdir, STATE_DIR)
    self.settings = _json_ready({'format': FORMAT, **settings})
    self.guard = guard
    self.stopper = Stopper(guard)
    self._epoch = epoch
    self._ids: Dict[str, dict] = {}  # name -> {'epoch', 'weights'}
    self._trackers: Dict[str, AutoAttackProgress] = {}
    self._saved = self._read()

  @classmethod
  def of(cls, exp, ckpts, final_meta: dict, guard=None) -> 'TestProgress':
    """The progress of `evaluation.test` of an experiment.Experiment: the settings that make its numbers
    (data set, PGD, evaluation batch, AutoAttack, input normalisation) key what is kept."""
    settings = {'dataset': exp.dataset_name, 'num_test': exp.data.num_examples('test'),
                'attack': exp.attack._asdict(), 'eval_batch_size': exp.eval_batch_size,
                'autoattack': exp.autoattack._asdict(), 'normalization': exp.normalization}
    return cls(exp.workdir, settings, guard=guard, is_chief=exp.is_chief, ckpts=ckpts,
               epoch=int(final_meta['epoch']))

  def _read(self) -> dict:
    path = os.path.join(self.folder, PARTIAL_FILE)
    if not os.path.exists(path):
      return {}
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      log.info('Test evaluation: %s cannot be read (%s); evaluating every checkpoint.', path, e)
      return {}
    if saved.get('settings') != self.settings:
      log.info('Test evaluation: the results in %s were made with other settings (%s); evaluating every '
               'checkpoint afresh.', path, _differences(saved.get('settings') or {}, self.settings))
      return {}
    return saved.get('entries', {})

  def finished(self, name: str, epoch: int, state) -> Optional[dict]:
    """The results entry of checkpoint `name` if an earlier, stopped evaluation of the same settings and
    weights finished it (every process agreeing), else None."""
    from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top
    variables = checkpoints.host_copy({'params': state.params, 'batch_stats': state.batch_stats}, True)
    self._ids[name] = {'epoch': int(epoch), 'weights': weights_digest(variables)}
    saved = self._saved.get(name)
    have = saved is not None and saved.get('id') == self._ids[name]
    if not _allgather([int(have)]).min():
      return None
    log.info('Test evaluation: the %s checkpoint (epoch %s) was evaluated before the stop; its results are '
             'read back from %s.', name, epoch, os.path.join(self.folder, PARTIAL_FILE))
    return saved

  def autoattack(self, name: str, aa) -> dict:
    """resume= and on_progress= for `autoattack.run` of checkpoint `name` by `aa`
    (evaluation.AutoAttackEvaluation)."""
    x, y, index = aa.points()
    cascade = aa.attacks or autoattack.version_attacks(aa.version, aa.norm)
    settings = {k: v for k, v in self.settings.items() if k != 'autoattack'}  # those below, explicitly
    fingerprint = {**settings, 'checkpoint': name, **self._ids.get(name, {}),
                   'attacks': list(cascade), 'version': aa.version, 'norm': aa.norm, 'eps': aa.eps,
                   'seed': aa.seed, 'batch_size': aa.batch_size, 'points': points_digest(x, y, index),
                   'num_points': int(len(y)), 'process': [jax.process_index(), jax.process_count()]}
    tracker = AutoAttackProgress(self, name, fingerprint, x)
    self._trackers[name] = tracker
    return {'resume': tracker.resume(), 'on_progress': tracker}

  def record(self, name: str, entry: dict, aa_seconds: Optional[float], top_level: Optional[dict] = None) -> None:
    """Keeps the finished entry of checkpoint `name` (and the results' `top_level` entries it wrote, such as
    the corruptions' settings), drops its AutoAttack state, then checks for a stop."""
    self._saved[name] = {'id': self._ids.get(name), 'entry': entry, 'aa_seconds': aa_seconds,
                         'top_level': top_level or {}}
    if self.is_chief:
      os.makedirs(self.folder, exist_ok=True)
      text = json.dumps({'settings': self.settings, 'entries': self._saved}, indent=1).encode()
      _atomic_write(os.path.join(self.folder, PARTIAL_FILE), lambda f: f.write(text))
    if name in self._trackers:
      self._trackers.pop(name).clear()
    self.check(f'after the evaluation of the {name} checkpoint')

  def check(self, where: str) -> None:
    if self.stopper():
      raise self.preempted(where)

  def preempted(self, where: str) -> Preempted:
    signal_name = self.guard.signal_name if self.guard is not None else None
    step = self._ckpts.latest_step() if self._ckpts is not None else None  # the training checkpoint's
    return Preempted(
        f'Stopped by {signal_name or "request"} {where}; the test evaluation\'s progress is saved in '
        f'{self.folder}. Run the same command again (same config and --workdir={self.workdir}) to resume from '
        'there: the evaluation then ends as an uninterrupted one would.',
        epoch=self._epoch, step=0, checkpoint_step=step if step is not None else -1)

  def done(self) -> None:
    """results.json is written: the progress is no longer needed (process 0 removes the folder)."""
    for tracker in self._trackers.values():
      tracker.clear()
    if self.is_chief:
      shutil.rmtree(self.folder, ignore_errors=True)
