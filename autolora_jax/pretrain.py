"""Where the fine-tuned feature extractor (FE) comes from, and how it enters the fine-tuning model.

* `pretrain_in_process`: a short PGD-AT pre-training (Madry et al.) of a `PretrainPlan`, cached in a folder
  named by a fingerprint of everything that determines it (experiment.pretrain_folder: under
  `config.pretrain.cache_dir`, default workdir/pretrain), so that a resumed run, and every method and seed
  of a comparison, start from the same FE without repeating it (the offline demo's robust FE).
* `load_pretrained`: a converted checkpoint (`config.pretrained=DIR`, written by `python -m
  autolora_jax.convert`) or a PyTorch or safetensors file converted on the fly
  (`config.pretrained=FILE.ckpt/.pt/.pth/.safetensors`, or such a file on the Hugging Face hub,
  `hf://ORG/REPO/PATH[@REVISION]`, downloaded once into huggingface_hub's cache). Its meta records the
  input normalisation the weights expect, which the fine-tuning model applies.
* `transplant`: copies an FE's convolution, BatchNorm parameters and statistics into freshly initialised
  fine-tuning variables; the new head and the LoRa branch keep their initialisation (docs/method.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import numpy as np
import optax
from flax import jax_utils, traverse_util

from autolora_jax import checkpoints, convert, loop, models, steps
from autolora_jax.data import create_dataset
from autolora_jax.errors import CheckpointError, ConfigError, DamagedCheckpointError

log = logging.getLogger(__name__)


def transplant(source: dict, target: dict) -> Tuple[dict, dict]:
  """Copies every FE entry of `source` into `target` ({'params', 'batch_stats'} trees).

  The head and LoRa parameters of `target` stay as they are. Every FE entry of `target` must exist in
  `source` with the same shape (a ViT's position embedding is resampled to the target's input size,
  `models.fit_pretrained`); the frozen BatchNorms of a TWINS model (`models.TwinBatchNorm`), which a
  plain FE does not have, start from the pre-trained BN of their pair, as the adaptive ones do.

  Returns:
    (variables, report) with report['unused'] the source entries not copied (e.g. its old head).
  """
  out, copied = {}, set()
  for collection in ('params', 'batch_stats'):
    src = traverse_util.flatten_dict(source.get(collection, {}), sep='/')
    flat = traverse_util.flatten_dict(target.get(collection, {}), sep='/')
    missing, mismatched = [], []
    for path, value in flat.items():
      group = models.param_group([p for p in path.split('/')]) if collection == 'params' else (
          'head' if path.startswith('head/') else 'fe')
      if group != 'fe':
        continue
      from_path = path if path in src else _frozen_twin_path(path)
      fitted = models.fit_pretrained(path, src[from_path], np.shape(value)) if from_path in src else None
      if from_path not in src:
        missing.append(path)
      elif np.shape(fitted) != np.shape(value):
        mismatched.append(f'{path}: {np.shape(src[from_path])} vs {np.shape(value)}')
      else:
        flat[path] = np.asarray(fitted, dtype=np.asarray(value).dtype)
        copied.add(f'{collection}/{from_path}')
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


def _frozen_twin_path(path: str) -> Optional[str]:
  """'layer1_0/bn1/frozen_mean' -> 'layer1_0/bn1/mean' (the BN a frozen twin starts from), else None."""
  *module, name = path.split('/')
  source = models.frozen_twin_source(name)
  return '/'.join(module + [source]) if source is not None else None


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
  return {'batch_stats': {}, **jax.device_get(variables)}  # a ViT has no BatchNorm statistics


class PretrainPlan(NamedTuple):
  """The in-process PGD-AT pre-training of an FE, as plain values (experiment.pretrain_plan makes it).

  Attributes:
    data_config: the `config.pretrain.dataset` sub-config (data.create_dataset reads it).
    seed: data order, initialisation and attack noise are drawn from it.
    epochs, batch_size, learning_rate: SGD with a cosine learning rate over all steps (set per epoch).
    momentum, weight_decay: as the fine-tuning optimizer.
    eps, step_size, attack_steps, attack_norm: the training PGD ('linf' or 'l2').
    input_size: the model's input side.
    make_model: num_classes -> the FE's model (the fine-tuning architecture without LoRa).
    folder: the cache folder (a function of `fingerprint`).
    fingerprint: everything the FE is a function of (JSON data), recorded with it.
  """
  data_config: Any
  seed: int
  epochs: int
  batch_size: int
  learning_rate: float
  momentum: float
  weight_decay: float
  eps: float
  step_size: float
  attack_steps: int
  input_size: int
  make_model: Callable[[int], Any]
  folder: str
  fingerprint: dict
  attack_norm: str = 'linf'


def pretrain_in_process(plan: PretrainPlan, *, progress: bool = True) -> dict:
  """PGD-AT pre-training of an FE on `plan.data_config`; returns {'params', 'batch_stats'} (host arrays).

  Uses the fine-tuning model's architecture without LoRa and a head for the pre-training classes, SGD
  with a cosine learning rate (optax) and the plan's attack; data order, initialisation and attack noise
  are drawn from plan.seed. The result is cached in `plan.folder`, in the folder <epochs>
  (checkpoints.save_variables): a second call loads it; a cached FE that cannot be read is moved aside
  (kept) and pre-trained again.
  """
  data = create_dataset(plan.data_config, seed=plan.seed, process_index=jax.process_index(),
                        process_count=jax.process_count())
  try:
    return _cached_or_trained(plan, data, progress)
  finally:
    data.close()  # an image data set's decoding threads


def _cached_or_trained(plan: PretrainPlan, data, progress: bool) -> dict:
  model = plan.make_model(data.num_classes)
  folder = plan.folder
  cached = os.path.join(folder, str(plan.epochs))
  steps_per_epoch = data.steps_per_epoch(plan.batch_size)
  variables = init_variables(model, plan.input_size, plan.seed + 1)
  if os.path.exists(cached):
    try:
      restored, _ = checkpoints.restore_variables(cached, jax.device_get(variables))
      log.info('Loaded the in-process pre-trained FE from %s', folder)
      return restored
    except DamagedCheckpointError as e:
      moved = checkpoints.move_aside(cached, os.path.join(folder, f'damaged-{plan.epochs}'))
      log.warning('The cached pre-trained FE %s cannot be read (%s); it is kept, moved to %s (nothing is '
                  'deleted), and the FE is pre-trained again.', cached, e.cause, moved)
  if steps_per_epoch < 1:
    raise ConfigError(f'config.pretrain.batch_size={plan.batch_size} exceeds the pre-training data '
                      f'({data.num_examples("train")} examples): lower it.')

  # Cosine decay over the whole pre-training, set per epoch (the lr is constant within an epoch).
  schedule = optax.cosine_decay_schedule(plan.learning_rate, decay_steps=plan.epochs * steps_per_epoch)
  tx = steps.make_optimizer(plan.learning_rate, plan.momentum, plan.weight_decay)
  state = loop.replicate(steps.create_train_state(model, variables, tx))
  p_step = loop.pmap_train_step(steps.make_train_step(model, method='pgd_at', eps=plan.eps,
                                                      step_size=plan.step_size, steps=plan.attack_steps,
                                                      norm=plan.attack_norm))
  name = plan.data_config.name
  log.info('PGD-AT pre-training: %d epochs of %d steps on %s (%d classes)', plan.epochs, steps_per_epoch,
           name, data.num_classes)
  for epoch in range(1, plan.epochs + 1):
    lr = float(schedule((epoch - 1) * steps_per_epoch))
    state = steps.set_learning_rate(state, lr)
    state, metrics, report = loop.train_epoch(
        p_step, state, data.train_batches(epoch, plan.batch_size), seed=plan.seed + 1, epoch=epoch,
        steps=steps_per_epoch, global_batch=plan.batch_size, progress=progress,
        desc=f'pre-train {epoch}/{plan.epochs}')
    log.info('pre-train epoch %d: lr %.4f, loss %.4f, train robust acc %.3f, %.0f img/s', epoch, lr,
             metrics['loss'], metrics['adv_acc'], report.images_per_second)
  result = jax.device_get(jax_utils.unreplicate({'params': state.params, 'batch_stats': state.batch_stats}))
  checkpoints.save_variables(cached, result, {'epochs': plan.epochs, 'dataset': name,
                                             'train_robust_acc': metrics['adv_acc'],
                                             'fingerprint': plan.fingerprint})
  return result


def load_pretrained(path: str, arch: str, stem: str, width: int) -> Tuple[dict, dict]:
  """Reads a pre-trained FE for the configured architecture (`config.pretrained`, model arch, stem, width).

  A folder is a checkpoint written by `python -m autolora_jax.convert` (its architecture must match); a
  file (.ckpt/.pt/.pth: needs torch; .safetensors: does not), local or a hub path
  hf://ORG/REPO/PATH[@REVISION] (autolora_jax.hub), is converted on the fly. The meta's 'mean' and 'std'
  are the input normalisation its weights were trained with, which the fine-tuning model must apply
  (experiment.resolve_normalization).

  Returns:
    (variables, meta): the FE and its old head ({'params', 'batch_stats'}, numpy) and the conversion's
    meta (arch, width, num_classes, mean, std, ...).
  Raises:
    CheckpointError for a missing or unreadable checkpoint, or one of another architecture or width.
  """
  converted_arch = convert.arch_for(arch, stem)
  if converted_arch not in convert.ARCHS:
    raise CheckpointError(f'config.pretrained is set, but there is no conversion for config.model.arch='
                          f'{arch!r} with stem={stem!r}: pre-trained checkpoints exist for '
                          f'{tuple(convert.ARCHS)} (--arch of python -m autolora_jax.convert).')
  if not models.spec(arch).takes('width'):
    width = None  # its sizes (a ViT's width and depth) are checked by the conversion (--arch) and the transplant
  variables, meta = convert.load_any(path, converted_arch)
  if width is not None and meta['width'] != width:
    raise CheckpointError(f'config.pretrained={path!r} holds a {converted_arch} of width {meta["width"]}, '
                          f'the config builds width {width}: set --config.model.width={meta["width"]}.')
  log.info('Pre-trained FE %s: %s, width %d, %s layout, from %s', path, converted_arch, meta['width'],
           meta.get('layout'), meta.get('source'))
  return variables, meta
