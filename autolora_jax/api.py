"""A finished run's model in a notebook: `load(workdir)` -> `Run` (model, variables, jitted logits, config,
normalisation, classes, results).

    import autolora_jax
    from autolora_jax import autoattack
    run = autolora_jax.load('/tmp/demo')            # the best checkpoint; checkpoint='final' for the last
    images, labels = run.test_points()              # the points the run's AutoAttack attacked
    logits = run.logits(images)                     # NHWC float images in [0, 1] -> (N, classes)
    result = autoattack.run(run.logits_fn, images, labels, eps=run.eps, norm=run.norm)

Nothing is trained or evaluated, and no data set is read (except by `Run.test_points`): everything comes
from the workdir (config.json, the checkpoint and its metadata, results.json).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from autolora_jax import checkpoints, evaluation, experiment, sampling
from autolora_jax import data as datasets
from autolora_jax import workdir as workdirs
from autolora_jax.data.core import to_unit
from autolora_jax.errors import CheckpointError, WorkdirError

log = logging.getLogger(__name__)

CHECKPOINTS = ('best', 'final')


@dataclasses.dataclass
class Run:
  """The deployed model of one checkpoint of a finished run.

  Attributes:
    model: the Flax model of the run (its LoRa branch and TWINS twins included); the deployed model is its
      `branch`, `model.apply(variables, x, branch=branch, train=False)`.
    variables: {'params', 'batch_stats'} of the checkpoint (numpy arrays).
    config: the run's config (config.json) as a ConfigDict.
    normalization: (mean, std) the model applies inside, or (None, None).
    classes: what each output means, in label order: the data set's class names where the workdir records
      them, else its class indices (the original data set's, for a `config.dataset.classes` subset).
    results: results.json of the run ({} if it has none).
    checkpoint: 'best' or 'final'; epoch: the checkpoint's epoch.
    eps, norm: the threat model the run was trained and evaluated for (AutoAttack's norm: 'Linf', 'L2').
    workdir: the absolute path of the run.
    branch: the deployed branch: 'adv' (the FE), or 'nat' (W + dW) for a method that deploys it
      (`Method.deployed_branch`, e.g. lora_at).
  """
  model: Any
  variables: dict
  config: ml_collections.ConfigDict
  normalization: tuple
  classes: list
  results: dict
  checkpoint: str
  epoch: int
  eps: float
  norm: str
  workdir: str
  branch: str = 'adv'

  def __post_init__(self):
    self._apply = jax.jit(evaluation.deployed_logits(self.model, self.branch))

  def logits(self, x) -> jax.Array:
    """The deployed model's logits (N, num_classes) for NHWC float images x in [0, 1] (jitted)."""
    return self._apply(self.variables, jax.numpy.asarray(x, jax.numpy.float32))

  @property
  def logits_fn(self) -> jax.tree_util.Partial:
    """The logits as `autoattack.run` takes them: `Partial(f, variables)`, compiled once per model."""
    return jax.tree_util.Partial(evaluation.deployed_logits(self.model, self.branch), self.variables)

  def test_points(self, n: Optional[int] = None, with_index: bool = False):
    """(images (n, H, W, C) float32 in [0, 1], labels (n,)): n test points chosen as the run's AutoAttack
    chooses them (config.autoattack.points: a class-stratified sample with its seed, or the first n); n None:
    the run's own config.autoattack.num_points, i.e. exactly the points it attacked; 0: all. with_index: also
    their positions in the test split (n,), which `autoattack.run(..., point_index=...)` draws each point's
    random keys from, as the run's own evaluation does. Reads the data set (as the run did)."""
    c = self.config.autoattack
    n = int(c.num_points) if n is None else int(n)
    data = datasets.create_dataset(self.config.dataset, seed=int(self.config.seed),
                                   reference_compat=bool(self.config.reference_compat))
    try:
      indices = sampling.sample_points(data.labels('test'), n, int(c.seed), str(c.get('points', 'first')))
      images, labels, index = sampling.sample_of(data, 'test', indices)
      return (to_unit(images), labels, index) if with_index else (to_unit(images), labels)
    finally:
      data.close()

  @property
  def num_classes(self) -> int:
    return int(np.shape(self.variables['params']['head']['bias'])[0])

  @property
  def input_shape(self) -> Optional[list]:
    """[C, H, W] of the images the run's data had (None if results.json does not record it)."""
    return self.results.get('input_shape')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (workdir/config.json), in the current format (`compat.upgrade_config`:
  keys added since then at their old values)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise WorkdirError(f'{workdir} has no config.json: it is not the workdir of a training run (pass the '
                       'folder given as --workdir to run.py or autolora-train).')
  try:
    data = workdirs.read_config_file(path)
  except (OSError, ValueError) as e:
    if isinstance(e, WorkdirError):
      raise
    raise WorkdirError(f'{path} cannot be read ({e}): it is not the config.json of a training run.') from None
  return ml_collections.ConfigDict(data)


def restore_checkpoint(workdir: str, checkpoint: str = 'best'):
  """(variables {'params', 'batch_stats'} as numpy, checkpoint metadata) of a finished run's 'best' or 'final'
  checkpoint; WorkdirError / CheckpointError with what to do when there is none."""
  if checkpoint not in CHECKPOINTS:
    raise CheckpointError(f'Unknown checkpoint {checkpoint!r}: choose one of {CHECKPOINTS} (the best '
                          'checkpoint by validation robust accuracy, or the last one of the run).')
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(os.path.join(root, 'latest')):
    raise WorkdirError(f'{workdir} holds no training checkpoint (no checkpoints/latest): train first '
                       '(python run.py --config=... --workdir=...) or point at the workdir of a finished run.')
  ckpts = checkpoints.Checkpoints(workdir)
  try:
    latest = ckpts.restore_as_saved('latest') if checkpoint == 'final' else None
    last_meta = latest[1] if latest is not None else ckpts.restore_meta('latest')
    if last_meta is None or not last_meta.get('done', False):
      epoch = None if last_meta is None else last_meta.get('epoch')
      raise CheckpointError(
          f'The run in {workdir} has not finished (last saved epoch: {epoch}): there is no final '
          f'checkpoint{" and its best one may still change" if checkpoint == "best" else ""}. Run the same '
          'training command again to finish it, then export or load it.')
    if checkpoint == 'final':
      state, meta = latest
      return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}, meta
    found = ckpts.restore_as_saved('best')
    if found is None:
      raise CheckpointError(f'{workdir} has no best checkpoint (checkpoints/best is empty or was set aside '
                            "as damaged): use checkpoint='final'.")
    state, meta = found
    return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}, meta
  finally:
    ckpts.close()


def class_labels(config, num_classes: int, results: dict) -> list:
  """results.json's class names if recorded; else the selected class indices, or 0 .. num_classes - 1."""
  if results.get('classes'):
    return list(results['classes'])
  selected: Sequence[int] = tuple(config.dataset.get('classes', ()) or ())
  return [int(c) for c in selected] if selected else list(range(num_classes))


def load(workdir: str, checkpoint: str = 'best') -> Run:
  """The deployed model of a finished run's 'best' or 'final' checkpoint (see `Run`).

  Raises:
    WorkdirError / CheckpointError (one paragraph, with what to do): a folder that is not a run's workdir, a
    run that has not finished, an unknown checkpoint name, a checkpoint that cannot be read.
  """
  path = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(path):
    raise WorkdirError(f'The workdir {path} does not exist: pass the folder given as --workdir to the training '
                       'run.')
  config = read_config(path)
  variables, meta = restore_checkpoint(path, checkpoint)
  num_classes = int(np.shape(variables['params']['head']['bias'])[0])
  normalization = experiment.normalization_of(meta) or experiment.configured_normalization(config.model)
  model = experiment.create_model(config, num_classes, normalization)
  results = evaluation.read_results(path)
  aa = experiment.autoattack_settings(config)
  return Run(model=model, variables=variables, config=config, normalization=tuple(normalization),
             classes=class_labels(config, num_classes, results), results=results, checkpoint=checkpoint,
             epoch=int(meta.get('epoch', -1)), eps=float(aa.eps), norm=aa.norm, workdir=path,
             branch=experiment.method_of(config).deployed_branch)
