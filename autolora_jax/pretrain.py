"""Where the fine-tuned feature extractor (FE) comes from, and how it enters the fine-tuning model.

* `pretrain_in_process`: a short PGD-AT pre-training (Madry et al.) on `config.pretrain.dataset`, cached
  in workdir/pretrain so that a resumed run does not repeat it (the offline demo's robust FE).
* `transplant`: copies an FE's convolution, BatchNorm parameters and statistics into freshly initialised
  fine-tuning variables; the new head and the LoRa branch keep their initialisation (SPEC.md).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import jax_utils, traverse_util

from autolora_jax import input_pipeline, loop, models, steps
from autolora_jax.errors import CheckpointError

log = logging.getLogger(__name__)


def transplant(source: dict, target: dict) -> Tuple[dict, dict]:
  """Copies every FE entry of `source` into `target` ({'params', 'batch_stats'} trees).

  The head and LoRa parameters of `target` stay as they are. Every FE entry of `target` must exist in
  `source` with the same shape.

  Returns:
    (variables, report) with report['unused'] the source entries not copied (e.g. its old head).
  """
  out, copied = {}, set()
  for collection in ('params', 'batch_stats'):
    src = traverse_util.flatten_dict(source.get(collection, {}), sep='/')
    flat = traverse_util.flatten_dict(target[collection], sep='/')
    missing, mismatched = [], []
    for path, value in flat.items():
      group = models.param_group([p for p in path.split('/')]) if collection == 'params' else (
          'head' if path.startswith('head/') else 'fe')
      if group != 'fe':
        continue
      if path not in src:
        missing.append(path)
      elif np.shape(src[path]) != np.shape(value):
        mismatched.append(f'{path}: {np.shape(src[path])} vs {np.shape(value)}')
      else:
        flat[path] = np.asarray(src[path], dtype=np.asarray(value).dtype)
        copied.add(f'{collection}/{path}')
    if missing or mismatched:
      raise CheckpointError(
          f'The pre-trained FE does not fit the configured model ({collection}): missing '
          f'{missing[:5]}{"..." if len(missing) > 5 else ""}, shape mismatches '
          f'{mismatched[:5]}{"..." if len(mismatched) > 5 else ""}. Check config.model.arch, width and stem '
          'against the checkpoint.')
    out[collection] = traverse_util.unflatten_dict(flat, sep='/')
  unused = sorted(f'{c}/{p}' for c in ('params', 'batch_stats')
                  for p in traverse_util.flatten_dict(source.get(c, {}), sep='/')
                  if f'{c}/{p}' not in copied)
  return out, {'copied': len(copied), 'unused': unused}


def init_variables(model, input_size: int, seed: int) -> dict:
  """Fresh {'params', 'batch_stats'} of `model` (host numpy arrays), drawn from PRNGKey(seed)."""
  x = np.zeros((1, input_size, input_size, 3), np.float32)
  return jax.device_get(jax.jit(lambda key: model.init(key, x))(jax.random.PRNGKey(seed)))


def _pretrain_manager(workdir: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'pretrain')),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False),
      item_names=('variables', 'meta'))


def pretrain_in_process(config, workdir: str, *, progress: bool = True) -> dict:
  """PGD-AT pre-training of an FE on `config.pretrain.dataset`; returns {'params', 'batch_stats'}.

  Uses the fine-tuning model's architecture without LoRa and a head for the pre-training classes, SGD
  with a cosine learning rate and the config's attack. The result is cached in workdir/pretrain.
  """
  pc = config.pretrain
  data = input_pipeline.create_dataset(pc.dataset, seed=config.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  model = models.create_model(config.model, data.num_classes, lora_rank=0)
  manager = _pretrain_manager(workdir)
  steps_per_epoch = data.steps_per_epoch(pc.batch_size)
  variables = init_variables(model, config.model.input_size, config.seed + 1)
  if manager.latest_step() == pc.epochs:
    restored = manager.restore(pc.epochs, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(jax.device_get(variables)), meta=ocp.args.JsonRestore()))
    log.info('Loaded the in-process pre-trained FE from %s', os.path.join(workdir, 'pretrain'))
    return restored['variables']
  if steps_per_epoch < 1:
    raise CheckpointError(f'config.pretrain.batch_size={pc.batch_size} exceeds the pre-training data '
                          f'({data.num_examples("train")} examples): lower it.')

  total = pc.epochs * steps_per_epoch
  tx = steps.make_optimizer(pc.learning_rate, config.optim.momentum, config.optim.weight_decay)
  state = loop.replicate(steps.create_train_state(model, variables, tx))
  a = config.attack
  p_step = loop.pmap_train_step(steps.make_train_step(model, method='pgd_at', eps=a.eps,
                                                      step_size=a.step_size, steps=a.train_steps))
  log.info('PGD-AT pre-training: %d epochs of %d steps on %s (%d classes)', pc.epochs,
               steps_per_epoch, pc.dataset.name, data.num_classes)
  for epoch in range(1, pc.epochs + 1):
    # Cosine decay over the whole pre-training, set per epoch.
    lr = 0.5 * pc.learning_rate * (1 + np.cos(np.pi * (epoch - 1) * steps_per_epoch / total))
    state = steps.set_learning_rate(state, lr)
    state, metrics, timing = loop.train_epoch(
        p_step, state, data.train_batches(epoch, pc.batch_size), seed=config.seed + 1, epoch=epoch,
        steps=steps_per_epoch, global_batch=pc.batch_size, progress=progress,
        desc=f'pre-train {epoch}/{pc.epochs}')
    log.info('pre-train epoch %d: lr %.4f, loss %.4f, train robust acc %.3f, %.0f img/s', epoch, lr,
                 metrics['loss'], metrics['adv_acc'], timing['images_per_second'])
  result = jax.device_get(jax_utils.unreplicate({'params': state.params, 'batch_stats': state.batch_stats}))
  manager.save(pc.epochs, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(result),
      meta=ocp.args.JsonSave({'epochs': pc.epochs, 'dataset': pc.dataset.name,
                              'train_robust_acc': metrics['adv_acc']})))
  manager.wait_until_finished()
  manager.close()
  return result


def feature_extractor(config, workdir: str, *, progress: bool = True) -> Optional[dict]:
  """The pre-trained FE variables the config asks for, or None for a random initialisation."""
  if config.pretrain.epochs > 0:
    return pretrain_in_process(config, workdir, progress=progress)
  if config.pretrained:
    raise CheckpointError(
        f'config.pretrained={config.pretrained!r}: loading pre-trained checkpoints from files is not '
        'available in this version; leave config.pretrained empty (random initialisation) or use '
        'config.pretrain.epochs for an in-process pre-training.')
  return None
