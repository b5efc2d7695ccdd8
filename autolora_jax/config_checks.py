"""Validation of a run's config before anything expensive starts (SPEC.md's ranges, known names); part of
the experiment layer (train.train_and_evaluate, evaluation.evaluate_workdir and compare call it).

`validate(config)` raises `errors.ConfigError` with a one-paragraph message naming the key, the value and
the fix. Unknown keys (typos) cannot reach it: configs/default.py locks the config, so a misspelt key
fails where it is set (run.py reports it the same way).
"""

from __future__ import annotations

from typing import Iterable

from autolora_jax import attacks, autoattack, corruptions, distributed, hub, models, ops, sampling
from autolora_jax.data import check_class_selection
from autolora_jax.errors import CheckpointError, ConfigError

DTYPES = ('float32', 'bfloat16')
LR_SCHEDULES = ('constant', 'piecewise', 'cosine')  # config.fixed.lr_schedule (policy.fixed_lr_schedule)


def _choice(name: str, value, choices: Iterable) -> None:
  choices = tuple(choices)
  if value not in choices:
    raise ConfigError(f'config.{name}={value!r} is not supported: choose one of {choices} '
                      f'(e.g. --config.{name}={choices[0]}).')


def _positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ConfigError(f'config.{name} must be a positive integer, got {value!r}.')


def _in_range(name: str, value, low: float, high: float, low_open: bool = True) -> None:
  ok = isinstance(value, (int, float)) and (low < value if low_open else low <= value) and value <= high
  if not ok:
    bracket = '(' if low_open else '['
    raise ConfigError(f'config.{name} must lie in {bracket}{low}, {high}], got {value!r}.')


# For the methods' own section checks (autolora_jax/methods/): ConfigError unless config.<name> = value is one
# of the choices, an integer > 0, a number in (low, high] ([low, high] with low_open=False).
choice, positive_int, in_range = _choice, _positive_int, _in_range


def validate(config) -> None:
  """Raises ConfigError for the first problem found in `config`."""
  from autolora_jax import methods  # pylint: disable=g-import-not-at-top (the methods import this module)
  method = methods.get(config.method)
  m = config.model
  _choice('model.arch', m.arch, models.ARCHITECTURES)
  if models.is_vit(m.arch):
    check_vit(config)
  else:
    _choice('model.stem', m.stem, models.STEMS)
  _choice('model.lora_placement', m.lora_placement, models.LORA_PLACEMENTS)
  _choice('model.conv_impl', m.conv_impl, ops.CONV_IMPLS)
  _choice('model.dtype', m.dtype, DTYPES)
  if m.precision not in models.PRECISIONS:
    raise ConfigError(f'config.model.precision={m.precision!r} is not supported: choose one of '
                      f'{models.PRECISIONS}, the matmul precision of the convolutions on GPUs and TPUs '
                      "('default': bfloat16 passes on TPUs and TF32 on A100/H100 GPUs for float32 "
                      "convolutions; 'high': more exact; 'highest': float32), e.g. "
                      '--config.model.precision=highest. CPUs compute float32 in float32 with any of them.')
  _positive_int('model.width', m.width)
  _positive_int('model.input_size', m.input_size)
  if not isinstance(m.lora_rank, int) or isinstance(m.lora_rank, bool) or m.lora_rank < 0:
    raise ConfigError(f'config.model.lora_rank must be an integer >= 0 (0: no LoRa branch), got '
                      f'{m.lora_rank!r}; the paper uses 8.')
  method.check(config)  # what the method needs of the model, e.g. AutoLoRa's LoRa rank
  if (m.mean is None) != (m.std is None) or (m.mean is not None and (len(m.mean) != 3 or len(m.std) != 3
                                                                     or min(m.std) <= 0)):
    raise ConfigError(f'config.model.mean and config.model.std must both be None or both 3 values with '
                      f'std > 0, got mean={m.mean!r}, std={m.std!r}.')
  a = config.attack
  _choice('attack.norm', a.get('norm', 'linf'), attacks.NORMS)
  top = 1.0 if a.get('norm', 'linf') == 'linf' else 1000.0  # an L2 length in [0, 1] pixels, e.g. 0.5, 3.0
  _in_range('attack.eps', a.eps, 0.0, top)
  _in_range('attack.step_size', a.step_size, 0.0, top)
  _positive_int('attack.train_steps', a.train_steps)
  _positive_int('attack.eval_steps', a.eval_steps)
  _in_range('dataset.val_fraction', config.dataset.val_fraction, 0.0, 1.0)
  if config.dataset.val_fraction >= 1.0:
    raise ConfigError('config.dataset.val_fraction must be below 1: the rest of the training split trains.')
  _in_range('dataset.test_fraction', config.dataset.test_fraction, 0.0, 1.0, low_open=False)
  _positive_int('dataset.train_per_class', config.dataset.train_per_class)
  check_data_config('dataset', config.dataset)
  _in_range('optim.momentum', config.optim.momentum, 0.0, 1.0, low_open=False)
  _in_range('optim.weight_decay', config.optim.weight_decay, 0.0, 1.0, low_open=False)
  _positive_int('batch_size', config.batch_size)
  _positive_int('eval_batch_size', config.eval_batch_size)
  if not isinstance(config.pretrain.epochs, int) or config.pretrain.epochs < 0:
    raise ConfigError(f'config.pretrain.epochs must be an integer >= 0, got {config.pretrain.epochs!r}.')
  if config.pretrain.epochs > 0:
    if config.pretrained:
      raise ConfigError(f'config.pretrained={config.pretrained!r} and config.pretrain.epochs='
                        f'{config.pretrain.epochs} both give the FE: set one of them (pretrain.epochs=0 to '
                        'load the checkpoint, or pretrained= to pre-train in process).')
    if not config.pretrain.dataset.name:
      raise ConfigError('config.pretrain.epochs > 0 needs config.pretrain.dataset.name, the data set the '
                        'in-process PGD-AT pre-training uses.')
    _positive_int('pretrain.batch_size', config.pretrain.batch_size)
    check_data_config('pretrain.dataset', config.pretrain.dataset)
    _in_range('pretrain.learning_rate', config.pretrain.learning_rate, 0.0, 10.0)
  check_pretrained(config.pretrained)
  check_method_settings(config)  # reference_compat and every method's own config section
  aa = config.autoattack
  _choice('autoattack.version', aa.version, tuple(autoattack.VERSIONS) + ('custom',))
  _choice('autoattack.norm', aa.get('norm', 'auto'), ('auto',) + autoattack.NORMS)
  from autolora_jax import experiment  # pylint: disable=g-import-not-at-top (experiment imports this module)
  aa_norm = experiment.autoattack_norm(config)
  listed = tuple(aa.get('attacks', ()))
  if aa.version == 'custom' and (not listed or any(x not in autoattack.ATTACKS for x in listed)):
    raise ConfigError(f'config.autoattack.version=custom runs config.autoattack.attacks, a non-empty list of '
                      f'names from {autoattack.ATTACKS}; got {listed!r} (e.g. '
                      "--config.autoattack.attacks=\"('apgd-ce','apgd-t')\").")
  for name in (listed if aa.version == 'custom' else ()):
    if aa_norm not in autoattack.ATTACK_NORMS[name]:
      raise ConfigError(f'config.autoattack.attacks has {name}, which does not run under norm {aa_norm} (it '
                        f'runs under {", ".join(autoattack.ATTACK_NORMS[name])}): leave it out.')
  if not isinstance(aa.get('eps', 0.0), (int, float)) or aa.get('eps', 0.0) < 0:
    raise ConfigError(f'config.autoattack.eps must be a number >= 0 (0: the run\'s attack.eps), got '
                      f'{aa.get("eps")!r}.')
  if aa.get('norm', 'auto') == 'L1' and not aa.get('eps', 0.0):
    raise ConfigError('config.autoattack.norm=L1 needs its own radius: set config.autoattack.eps (e.g. 12 '
                      'on CIFAR-10, the usual L1 budget); the PGD eps is an L-infinity or L2 length.')
  _positive_int('autoattack.batch_size', aa.batch_size)
  if not isinstance(aa.num_points, int) or isinstance(aa.num_points, bool) or aa.num_points < 0:
    raise ConfigError(f'config.autoattack.num_points must be an integer >= 0 (N test points; 0 = '
                      f'all), got {aa.num_points!r}.')
  _choice('autoattack.points', aa.get('points', 'first'), sampling.POINT_SAMPLES)
  corruptions.check_config(config)  # config.eval's common corruptions
  check_host(config.host)
  distributed.check(config.distributed)


def check_pretrained(pretrained) -> None:
  """config.pretrained's form: a hub path must be hf://ORG/REPO/PATH[@REVISION]. Local paths and hub files
  are checked where they are read (pretrain.load_pretrained), which downloads a hub file."""
  if hub.is_hub_path(pretrained):
    try:
      hub.parse_hub_path(pretrained)
    except CheckpointError as e:
      raise ConfigError(f'config.pretrained: {e}') from None


def check_vit(config) -> None:
  """A ViT's config.model (stem, input size, LoRa targets and init, config.model.vit) and the settings that
  only a ResNet has: reference_compat's block placement and TWINS's BatchNorms."""
  m = config.model
  if m.stem not in models.VIT_STEMS:
    raise ConfigError(f'config.model.stem={m.stem!r} is a ResNet stem; config.model.arch={m.arch} takes '
                      f"'imagenet' (the 16x16 patch embedding) or 'convstem' (the convolutional stem of the robust "
                      f'ImageNet ViTs), e.g. --config.model.stem=imagenet.')
  if m.input_size % models.vit.PATCH_SIZE:
    up = -(-m.input_size // models.vit.PATCH_SIZE) * models.vit.PATCH_SIZE
    raise ConfigError(f'config.model.input_size={m.input_size} is not a multiple of the ViT\'s 16x16 patches: '
                      f'use e.g. --config.model.input_size={up} (224 is the ImageNet checkpoints\' own; other '
                      'sizes resample their position embedding).')
  targets = m.get('lora_targets', models.LORA_TARGETS)
  if isinstance(targets, str) or not targets or any(t not in models.LORA_TARGETS for t in targets):
    raise ConfigError(f'config.model.lora_targets={targets!r} has an unknown LoRa target: choose a non-empty '
                      f'list from {models.LORA_TARGETS} (q, k, v: slices of the fused qkv projection; proj: the '
                      "attention output; fc1, fc2: the MLP), e.g. --config.model.lora_targets=\"('q','v')\".")
  _choice('model.lora_init', m.get('lora_init', 'normal'), models.LORA_INITS)
  sizes = m.get('vit') or {}
  for key in ('dim', 'depth', 'heads'):
    v = sizes.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ConfigError(f'config.model.vit.{key} must be an integer >= 0 (0: the architecture\'s own), got {v!r}.')
  dim, _, heads = models.VIT_SIZES[m.arch]
  dim, heads = sizes.get('dim') or dim, sizes.get('heads') or heads
  if dim % heads:
    raise ConfigError(f'The ViT\'s width {dim} (config.model.vit.dim) is not a multiple of its {heads} heads '
                      '(config.model.vit.heads).')
  if m.lora_placement != 'all':
    raise ConfigError(f"config.model.lora_placement={m.lora_placement!r} places LoRa in ResNet blocks; a ViT "
                      'places it by config.model.lora_targets: leave lora_placement at \'all\'.')
  if config.reference_compat:
    raise ConfigError('config.reference_compat reproduces the authors\' public ResNet code (LoRa in the last '
                      f'block of each stage, ...), which has no ViT: with config.model.arch={m.arch} set '
                      '--config.reference_compat=False.')
  from autolora_jax import methods  # pylint: disable=g-import-not-at-top (the methods import this module)
  method = methods.get(config.method)
  if method.needs_batchnorm:
    raise ConfigError(f'{method.title} (config.method={config.method}) needs a network with BatchNorms, and '
                      f'config.model.arch={m.arch} has none (it normalises with LayerNorms): use a ResNet for '
                      f'{method.title}, or another method with the ViT.')


def check_host(h) -> None:
  """config.host: how the host feeds the devices (see configs/default.py)."""
  _positive_int('host.metrics_every', h.metrics_every)
  _positive_int('host.plot_every', h.plot_every)
  if not isinstance(h.decode_threads, int) or isinstance(h.decode_threads, bool) or h.decode_threads < 0:
    raise ConfigError(f'config.host.decode_threads must be an integer >= 0 (the threads that decode the '
                      'images; 0 = the cores this process may run on, at most 32), got '
                      f'{h.decode_threads!r}.')
  if not isinstance(h.prefetch, int) or isinstance(h.prefetch, bool) or not 1 <= h.prefetch <= 8:
    raise ConfigError(f'config.host.prefetch must be an integer from 1 to 8 (batches put on the devices ahead '
                      f'of the step; each one holds a global batch in device memory), got {h.prefetch!r}; '
                      '2 is the default.')


def check_data_config(key: str, data_config) -> None:
  """The keys of one data set's config that can be checked without reading it (`key`: 'dataset' or
  'pretrain.dataset'): train_per_class_limit, preprocess and the class indices where the class count is
  known (folders are counted when the data set is created, still before any model is built)."""
  limit = data_config.get('train_per_class_limit', 0)
  if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
    raise ConfigError(f'config.{key}.train_per_class_limit must be an integer >= 0 (at most that many training '
                      f'examples of each class; 0 = all), got {limit!r}.')
  _choice(f'{key}.preprocess', data_config.get('preprocess', 'imagenet'), ('imagenet', 'cifar'))
  check_class_selection(data_config, key=f'config.{key}', read=False)


def check_devices(config, device_count: int, process_count: int = 1) -> None:
  """Every global batch of the run must split evenly over all devices of all processes."""
  check_batch_divides('batch_size', config.batch_size, device_count)
  check_batch_divides('eval_batch_size', config.eval_batch_size, device_count)
  if config.pretrain.epochs > 0:
    check_batch_divides('pretrain.batch_size', config.pretrain.batch_size, device_count)
  from autolora_jax import methods  # pylint: disable=g-import-not-at-top (the methods import this module)
  methods.get(config.method).check_devices(config, device_count)  # e.g. TWINS's even per-device batch
  if device_count % process_count:
    raise ConfigError(f'The {device_count} devices of this run do not split evenly over its {process_count} '
                      'processes: give every process the same number of devices.')


def check_batch_divides(name: str, batch_size: int, device_count: int) -> None:
  """A global batch must split evenly over all devices (of all processes)."""
  if batch_size % device_count:
    lower = batch_size - batch_size % device_count
    raise ConfigError(
        f'config.{name}={batch_size} does not divide over the {device_count} devices of this run: each '
        f'device must get the same number of examples. Use a multiple of {device_count}, e.g. '
        f'--config.{name}={max(lower, device_count)}.')


def check_method_settings(config) -> None:
  """Raises ConfigError for a bad `config.reference_compat` or a bad value in a registered method's own
  config section (config.fixed, config.twins, ...: `Method.check_section`, for every section the config
  holds, whichever method runs)."""
  from autolora_jax import methods  # pylint: disable=g-import-not-at-top (the methods import this module)
  if not isinstance(config.reference_compat, bool):
    raise ConfigError(f'config.reference_compat must be True or False, got {config.reference_compat!r}.')
  missing = [s for s in methods.get(config.method).sections if s not in config]
  if missing:
    raise ConfigError(f'config.method={config.method} reads config.{missing[0]}, which this config lacks: register '
                      'the method before the config is made (configs/default.py adds the sections of the methods '
                      'registered then), e.g. import its module at the top of your config file.')
  for method in methods.registered():
    sections = methods.defined_sections(method)
    if sections and all(section in config for section in sections):
      method.check_section(config)


def check_lr_schedule(key: str, c, what: str) -> None:
  """config.<key>'s fixed learning-rate schedule (policy.fixed_lr_schedule): lr, lr_schedule, epochs,
  boundaries and decay; `what` names the run it drives."""
  if c.lr_schedule not in LR_SCHEDULES:
    raise ConfigError(f'config.{key}.lr_schedule={c.lr_schedule!r} is not supported: choose one of '
                      f'{LR_SCHEDULES} (e.g. --config.{key}.lr_schedule=piecewise).')
  if not isinstance(c.epochs, int) or isinstance(c.epochs, bool) or c.epochs <= 0:
    raise ConfigError(f'config.{key}.epochs must be a positive integer (the length of {what}), got '
                      f'{c.epochs!r}.')
  if not isinstance(c.lr, (int, float)) or not 0 < c.lr <= 10:
    raise ConfigError(f'config.{key}.lr must lie in (0, 10], got {c.lr!r}.')
  if not isinstance(c.decay, (int, float)) or not 0 < c.decay <= 1:
    raise ConfigError(f'config.{key}.decay (the piecewise schedule\'s factor at each boundary) must lie in '
                      f'(0, 1], got {c.decay!r}.')
  b = tuple(c.boundaries)
  if (not all(isinstance(e, int) and not isinstance(e, bool) for e in b) or list(b) != sorted(set(b))
      or (b and not 0 < b[0] <= b[-1] < c.epochs)):
    raise ConfigError(f'config.{key}.boundaries must be increasing whole epochs inside (0, {key}.epochs='
                      f'{c.epochs}), after which the lr is multiplied by {key}.decay; got {b!r} (e.g. '
                      f'--config.{key}.boundaries="({c.epochs // 2}, {3 * c.epochs // 4})").')
