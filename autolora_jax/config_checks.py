"""Validation of a run's config before anything expensive starts (docs/method.md's ranges, known names); part of
the experiment layer (train.train_and_evaluate, evaluation.evaluate_workdir and compare call it).

`validate(config)` raises `errors.ConfigError` with a one-paragraph message naming the key, the value and
the fix. Unknown keys (typos) cannot reach it: configs/default.py locks the config, so a misspelt key
fails where it is set (run.py reports it the same way).
"""

from __future__ import annotations

from autolora_jax import (
  attacks,
  autoattack,
  corruptions,
  distributed,
  hub,
  methods,
  models,
  ops,
  remat,
  sampling,
)
from autolora_jax.data import check_class_selection
from autolora_jax.errors import CheckpointError, ConfigError
from autolora_jax.value_checks import choice, in_range, positive_int

_choice, _positive_int, _in_range = choice, positive_int, in_range

DTYPES = ('float32', 'bfloat16')
# config.attack.norm -> AutoAttack's norm when config.autoattack.norm is 'auto'.
AUTOATTACK_NORM = {'linf': 'Linf', 'l2': 'L2'}


def autoattack_norm(config) -> str:
  """AutoAttack's norm: config.autoattack.norm, or for 'auto' the training attack's (Linf, L2)."""
  norm = str(config.autoattack.get('norm', 'auto'))
  return AUTOATTACK_NORM.get(str(config.attack.get('norm', 'linf')), 'Linf') if norm == 'auto' else norm


def validate(config) -> None:
  """Raises ConfigError for the first problem found in `config`."""
  method = methods.get(config.method)
  m = config.model
  _choice('model.arch', m.arch, models.arch_names())
  check_arch(config)
  _choice('model.conv_impl', m.conv_impl, ops.CONV_IMPLS)
  _choice('model.attention_impl', m.get('attention_impl', 'auto'), models.ATTENTION_IMPLS)
  _choice('model.dtype', m.dtype, DTYPES)
  _choice('model.remat', m.get('remat', 'none'), remat.MODES)
  if m.get('attention_impl', 'auto') == 'cudnn' and m.dtype != 'bfloat16':
    raise ConfigError(f"config.model.attention_impl='cudnn' needs config.model.dtype='bfloat16' (cuDNN's fused "
                      f'attention takes float16 and bfloat16 inputs; this model computes in {m.dtype}): set '
                      "--config.model.dtype=bfloat16, or leave attention_impl at 'auto' (JAX's choice).")
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
  check_auto_lr0(config, method)
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
  aa_norm = autoattack_norm(config)
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
  val_attacks = config.eval.get('val_attacks', ())
  if isinstance(val_attacks, str) or any(a not in autoattack.ATTACKS for a in val_attacks):
    raise ConfigError(f'config.eval.val_attacks takes a list of names from {autoattack.ATTACKS} (or none), got '
                      f"{val_attacks!r}: e.g. --config.eval.val_attacks=\"('apgd-ce',)\".")
  for name in val_attacks:
    if aa_norm not in autoattack.ATTACK_NORMS[name]:
      raise ConfigError(f'config.eval.val_attacks has {name}, which does not run under norm {aa_norm} (it runs '
                        f'under {", ".join(autoattack.ATTACK_NORMS[name])}): leave it out.')
  corruptions.check_config(config)  # config.eval's common corruptions
  check_host(config.host)
  distributed.check(config.distributed)


def check_auto_lr0(config, method) -> None:
  """config.auto_lr.lr0='auto' (the probe that picks the initial learning rate) only for a method whose policy
  starts at config.auto_lr.lr0 (`Method.auto_lr0`: AutoLoRa's automatic schedule)."""
  lr0 = config.auto_lr.lr0 if 'auto_lr' in config else None
  if not (isinstance(lr0, str) and lr0.strip().lower() == 'auto') or method.auto_lr0:
    return
  auto = [m.name for m in methods.registered() if m.auto_lr0]
  raise ConfigError(
      f"config.auto_lr.lr0='auto' lets a short probe pick the initial learning rate of an automatic schedule, and "
      f'{method.title} (config.method={method.name}) has none: its learning rate is a fixed schedule of its own '
      f'config section{" (" + ", ".join("config." + s for s in method.sections) + ")" if method.sections else ""}. '
      f'Set that learning rate instead and leave config.auto_lr.lr0 a number, or run a method with the automatic '
      f'schedule ({", ".join(auto) or "none registered"}, e.g. --config.method={auto[0] if auto else "autolora"}).')


def check_pretrained(pretrained) -> None:
  """config.pretrained's form: a hub path must be hf://ORG/REPO/PATH[@REVISION]. Local paths and hub files
  are checked where they are read (pretrain.load_pretrained), which downloads a hub file."""
  if hub.is_hub_path(pretrained):
    try:
      hub.parse_hub_path(pretrained)
    except CheckpointError as e:
      raise ConfigError(f'config.pretrained: {e}') from None


def check_arch(config) -> None:
  """config.model as its architecture (`models.spec`) takes it: the family's own checks, the stem and LoRa
  placement; and the settings that need what it may lack: reference_compat the authors' code, TWINS
  BatchNorms."""
  m = config.model
  arch = models.spec(m.arch)
  if arch.check_config is not None:
    arch.check_config(m)
  _choice('model.stem', m.stem, arch.stems)
  _choice('model.lora_placement', m.lora_placement, arch.lora_placements)
  check_drop_path(m, arch)
  if config.reference_compat and not arch.reference_code:
    raise ConfigError('config.reference_compat reproduces the authors\' public ResNet code (LoRa in the last '
                      f'block of each stage, ...), which has no {arch.label}: with config.model.arch={m.arch} set '
                      '--config.reference_compat=False.')
  method = methods.get(config.method)
  if method.needs_batchnorm and not arch.has_batchnorm:
    with_bn = tuple(s.name for s in models.specs() if s.has_batchnorm)
    raise ConfigError(f'{method.title} (config.method={config.method}) needs a network with BatchNorms, and '
                      f'config.model.arch={m.arch} has none: use an architecture with BatchNorms for '
                      f'{method.title} ({", ".join(with_bn)}), or another method with the {arch.label}.')


def check_drop_path(m, arch) -> None:
  """config.model.drop_path: a rate in [0, 1), above 0 only for an architecture with stochastic depth."""
  rate = m.get('drop_path', 0.0)
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ConfigError(f'config.model.drop_path={rate!r} must be a rate in [0, 1): the probability that the last '
                      'block\'s residual branch is dropped in training (the earlier blocks\' rates rise linearly '
                      'from 0); 0.0, the default, fine-tunes without stochastic depth.')
  if rate and not arch.drop_path:
    families = ', '.join(dict.fromkeys(s.label for s in models.specs() if s.drop_path)) or 'none registered'
    raise ConfigError(f'config.model.drop_path={rate}: the {arch.label} (config.model.arch={m.arch}) has no '
                      f'stochastic depth; set --config.model.drop_path=0.0, or use an architecture with it '
                      f'({families}).')


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


