"""Where the fine-tuned feature extractor (FE) comes from, and how it enters the fine-tuning model.

* `pretrain_in_process`: a short PGD-AT pre-training (Madry et al.) on `config.pretrain.dataset`, cached
  in `config.pretrain.cache_dir` (default workdir/pretrain) under a fingerprint of everything that
  determines it, so that a resumed run, and every method and seed of a comparison, start from the same FE
  without repeating it (the offline demo's robust FE).
* `load_pretrained`: a converted checkpoint (`config.pretrained=DIR`, written by `python -m
  autolora_jax.convert`) or a PyTorch file converted on the fly (`config.pretrained=FILE.ckpt/.pt/.pth`).
  The input normalisation the checkpoint expects becomes config.model.mean/std (the model applies it).
* `transplant`: copies an FE's convolution, BatchNorm parameters and statistics into freshly initialised
  fine-tuning variables; the new head and the LoRa branch keep their initialisation (SPEC.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional, Tuple

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import jax_utils, traverse_util

from autolora_jax import convert, input_pipeline, loop, models, ops, steps
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
  """Fresh {'params', 'batch_stats'} of `model` (host numpy arrays), drawn from `seed`.

  Compiled for the host CPU with XLA's own convolution and max-pool and XLA's random-bit generator (key
  impl 'rbg'): the variables depend on neither the convolution nor the accelerator, and the default
  threefry keys made this one program compile in 13.5 s for the demo's network against 5.7 s (2-core CPU).
  """
  x = np.zeros((1, input_size, input_size, 3), np.float32)
  plain = model
  if isinstance(model, models.ResNet):
    plain = model.clone(conv_fn=models.native_conv2d, pool_fn=models.native_max_pool)
  try:
    device = jax.local_devices(backend='cpu')[0]  # this process's own (jax.devices() lists all processes')
  except RuntimeError:  # JAX_PLATFORMS without cpu: the default device
    device = jax.local_devices()[0]
  with jax.default_device(device):
    variables = jax.jit(plain.init)(jax.random.key(seed, impl='rbg'), x)
  return jax.device_get(variables)


def fingerprint(config) -> dict:
  """Everything the in-process pre-trained FE is a function of (JSON data): the model, the pre-training
  settings and data, the attack and the optimizer; not config.seed (the FE has its own, pretrain.seed)."""
  pc = config.pretrain.to_dict()
  pc.pop('cache_dir', None)
  return json.loads(json.dumps({'model': config.model.to_dict(), 'pretrain': pc,
                                'attack': config.attack.to_dict(), 'optim': config.optim.to_dict()},
                               sort_keys=True, default=list))


def cache_folder(config, workdir: str) -> str:
  """The folder of this config's pre-trained FE: CACHE/<16 hex digits of its fingerprint's hash>, CACHE
  being config.pretrain.cache_dir or workdir/pretrain."""
  base = config.pretrain.cache_dir or os.path.join(workdir, 'pretrain')
  digest = hashlib.sha256(json.dumps(fingerprint(config), sort_keys=True).encode()).hexdigest()[:16]
  return os.path.abspath(os.path.join(os.path.expanduser(base), digest))


def _pretrain_manager(folder: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      folder,
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False),
      item_names=('variables', 'meta'))


def pretrain_in_process(config, workdir: str, *, progress: bool = True) -> dict:
  """PGD-AT pre-training of an FE on `config.pretrain.dataset`; returns {'params', 'batch_stats'}.

  Uses the fine-tuning model's architecture without LoRa and a head for the pre-training classes, SGD
  with a cosine learning rate (optax) and the config's attack; data order, initialisation and attack
  noise are drawn from config.pretrain.seed. The result is cached in `cache_folder(config, workdir)`.
  """
  pc = config.pretrain
  data = input_pipeline.create_dataset(pc.dataset, seed=pc.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  conv_fn, pool_fn = ops.convolutions(config.model.conv_impl, jax.default_backend())
  model = models.create_model(config.model, data.num_classes, conv_fn=conv_fn, pool_fn=pool_fn, lora_rank=0)
  folder = cache_folder(config, workdir)
  manager = _pretrain_manager(folder)
  steps_per_epoch = data.steps_per_epoch(pc.batch_size)
  variables = init_variables(model, config.model.input_size, pc.seed + 1)
  if manager.latest_step() == pc.epochs:
    restored = manager.restore(pc.epochs, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(jax.device_get(variables)), meta=ocp.args.JsonRestore()))
    manager.close()
    log.info('Loaded the in-process pre-trained FE from %s', folder)
    return restored['variables']
  if steps_per_epoch < 1:
    raise CheckpointError(f'config.pretrain.batch_size={pc.batch_size} exceeds the pre-training data '
                          f'({data.num_examples("train")} examples): lower it.')

  # Cosine decay over the whole pre-training, set per epoch (the lr is constant within an epoch).
  schedule = optax.cosine_decay_schedule(pc.learning_rate, decay_steps=pc.epochs * steps_per_epoch)
  tx = steps.make_optimizer(pc.learning_rate, config.optim.momentum, config.optim.weight_decay)
  state = loop.replicate(steps.create_train_state(model, variables, tx))
  a = config.attack
  p_step = loop.pmap_train_step(steps.make_train_step(model, method='pgd_at', eps=a.eps,
                                                      step_size=a.step_size, steps=a.train_steps))
  log.info('PGD-AT pre-training: %d epochs of %d steps on %s (%d classes)', pc.epochs,
               steps_per_epoch, pc.dataset.name, data.num_classes)
  for epoch in range(1, pc.epochs + 1):
    lr = float(schedule((epoch - 1) * steps_per_epoch))
    state = steps.set_learning_rate(state, lr)
    state, metrics, timing = loop.train_epoch(
        p_step, state, data.train_batches(epoch, pc.batch_size), seed=pc.seed + 1, epoch=epoch,
        steps=steps_per_epoch, global_batch=pc.batch_size, progress=progress,
        desc=f'pre-train {epoch}/{pc.epochs}')
    log.info('pre-train epoch %d: lr %.4f, loss %.4f, train robust acc %.3f, %.0f img/s', epoch, lr,
                 metrics['loss'], metrics['adv_acc'], timing['images_per_second'])
  result = jax.device_get(jax_utils.unreplicate({'params': state.params, 'batch_stats': state.batch_stats}))
  manager.save(pc.epochs, args=ocp.args.Composite(
      variables=ocp.args.StandardSave(result),
      meta=ocp.args.JsonSave({'epochs': pc.epochs, 'dataset': pc.dataset.name,
                              'train_robust_acc': metrics['adv_acc'], 'fingerprint': fingerprint(config)})))
  manager.wait_until_finished()
  manager.close()
  return result


def load_pretrained(config) -> Optional[Tuple[dict, dict]]:
  """Reads config.pretrained for the configured architecture; None when it is empty.

  A folder is a checkpoint written by `python -m autolora_jax.convert` (its architecture must match); a
  file (.ckpt/.pt/.pth) is converted on the fly (needs torch). The checkpoint's input normalisation is
  what its weights were trained with, so it replaces config.model.mean/std when they differ (logged):
  the fine-tuning model must normalise as the FE expects. Call it before building the model.

  Returns:
    (variables, meta): the FE and its old head ({'params', 'batch_stats'}, numpy) and the conversion's
    meta (arch, width, num_classes, mean, std, ...).
  Raises:
    CheckpointError for a missing or unreadable checkpoint, or one of another architecture or width.
  """
  if not config.pretrained:
    return None
  m = config.model
  arch = convert.arch_for(m.arch, m.stem)
  if arch not in convert.ARCHS:
    raise CheckpointError(f'config.pretrained is set, but there is no conversion for config.model.arch='
                          f'{m.arch!r} with stem={m.stem!r}: pre-trained checkpoints exist for '
                          f'{tuple(convert.ARCHS)} (--arch of python -m autolora_jax.convert).')
  variables, meta = convert.load_any(config.pretrained, arch)
  if meta['width'] != m.width:
    raise CheckpointError(f'config.pretrained={config.pretrained!r} holds a {arch} of width {meta["width"]}, '
                          f'the config builds width {m.width}: set --config.model.width={meta["width"]}.')
  mean = tuple(meta['mean']) if meta.get('mean') is not None else None
  std = tuple(meta['std']) if meta.get('std') is not None else None

  def same(a, b):
    return (a is None) == (b is None) and (a is None or np.allclose(a, b, rtol=0, atol=1e-6))

  if not (same(mean, m.mean) and same(std, m.std)):
    log.info('config.model.mean/std set to the input normalisation of %s: mean %s, std %s (was %s, %s).',
             config.pretrained, mean, std, m.mean, m.std)
    m.mean, m.std = mean, std
  log.info('Pre-trained FE %s: %s, width %d, %s layout, from %s', config.pretrained, arch, meta['width'],
           meta.get('layout'), meta.get('source'))
  return variables, meta


def feature_extractor(config, workdir: str, *, progress: bool = True,
                      pretrained: Optional[Tuple[dict, dict]] = None) -> Optional[dict]:
  """The pre-trained FE variables the config asks for, or None for a random initialisation.

  `pretrained` is what `load_pretrained(config)` returned, if the caller has read it already.
  """
  if config.pretrain.epochs > 0:
    return pretrain_in_process(config, workdir, progress=progress)
  if config.pretrained:
    variables, _ = pretrained if pretrained is not None else load_pretrained(config)
    return variables
  return None
