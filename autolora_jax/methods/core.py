"""`Method`, the value that is a fine-tuning method, and the registry that names them.

A method is a plain frozen value of functions and constants: its loss, its model overrides, its epoch
policy, its config section with defaults and checks, what it adds to results.json, and how the comparison
shows it. The training loop, the config checks, the workdir's config comparison and the evaluation read
the method of a run from the registry by `config.method`, so a method registered from a user's module runs
everywhere a built-in one does (docs/methods.md, "Writing a method of your own").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import ml_collections

from autolora_jax import policy
from autolora_jax import step_parts as steps
from autolora_jax.errors import ConfigError

# loss_fn(params, state, x, x_adv, y) -> (loss, (parts, batch_stats, accuracies)): the differentiated
# function of one train step. parts and accuracies are dicts of scalars (metrics.jsonl's train_* columns).
LossFn = Callable[..., Tuple[Any, Tuple[Dict[str, Any], Any, Dict[str, Any]]]]


class LossContext(NamedTuple):
  """What `Method.make_loss` builds a step's loss from.

  Attributes:
    model: the run's Flax model (e.g. a `models.ResNet` or `models.ViT`).
    forward: `forward(params, batch_stats, x, **apply_kwargs) -> (logits, new batch_stats)`, the model in
      training mode (BatchNorm batch statistics, synchronised over the mapped devices).
    settings: the method's resolved settings (`Method.settings(config)`; None for a method without any).
    kl_denominator: the per-device KL denominator (`experiment.kl_denominator`); None: the actual batch.
  """
  model: Any
  forward: Callable
  settings: Any = None
  kl_denominator: Optional[float] = None


def _no_settings(config) -> None:
  del config


def _no_check(config) -> None:
  del config


def _no_device_check(config, device_count: int) -> None:
  del config, device_count


def _no_overrides(config) -> Dict[str, Any]:
  del config
  return {}


def _no_results(settings) -> Dict[str, Any]:
  del settings
  return {}


def optim_weight_decay(config) -> float:
  """config.optim.weight_decay, the coupled weight decay of every method that brings none of its own."""
  return float(config.optim.weight_decay)


@dataclasses.dataclass(frozen=True)
class Method:
  """A fine-tuning method as a value. Only `name`, `make_loss` and `policy` have no default.

  Attributes:
    name: `config.method`'s value, the workdir folder name of the comparison.
    make_loss: `make_loss(ctx: LossContext) -> LossFn`, the differentiated loss of one train step; the
      step around it (PGD on `deployed_branch`, the gradient and its mean over devices, the update) is
      `steps.make_train_step`'s.
    policy: `policy(config) -> policy.EpochPolicy`: the learning rate and loss scalars l1, l2 (the
      TrainState's, for the loss) of each epoch, the best checkpoint and the stop.
    display_name: how tables and plots name it ('' = `name`).
    settings: `settings(config) -> value`: the method's settings resolved once from its config section
      (a NamedTuple, say), given to `make_loss` as `ctx.settings` and to `results`.
    sections: the config sections the method reads besides the common ones (a run of another method
      ignores the keys of a section that its workdir's config.json lacks: such a run resumes).
    defaults: `defaults() -> {section: ConfigDict}`, the sections this method defines, with their
      defaults; `add_config_sections` (configs/default.py) puts them into every config.
    check_section: `check_section(config)` raises ConfigError for a bad value in `defaults`'s sections
      (run for every registered method whose sections the config holds).
    check: `check(config)` raises ConfigError for what the method needs of the rest of the config when
      it runs (e.g. a LoRa rank).
    check_devices: `check_devices(config, device_count)`, the same for the run's device count.
    model_overrides: `model_overrides(config) -> dict`, keyword overrides of `models.create_model`.
    weight_decay: `weight_decay(config) -> float`, the optimizer's coupled weight decay.
    make_optimizer: `make_optimizer(learning_rate, momentum, weight_decay)`, an optax transformation with
      an injected learning_rate hyper-parameter (`steps.make_optimizer`'s form; the host sets it).
    results: `results(settings) -> dict`, what the method adds to results.json's top level.
    deployed_branch: the model branch the method trains adversarially and deploys: the training PGD,
      validation, test, AutoAttack and `autolora_jax.load` use it ('adv': the FE; 'nat': W + the LoRa
      update).
    needs_batchnorm: whether the method needs a network with BatchNorms (not a ViT).
    in_default_comparison: whether `python -m autolora_jax.compare` runs it without --methods.
    auto_lr0: whether the method's policy starts at config.auto_lr.lr0, so that `config.auto_lr.lr0='auto'`
      (a probe over config.auto_lr.lr0_candidates before the first epoch, autolora_jax/lr_probe.py) can
      choose it; a run of another method refuses lr0='auto'.
  """
  name: str
  make_loss: Callable[[LossContext], LossFn]
  policy: Callable[[Any], policy.EpochPolicy]
  display_name: str = ''
  settings: Callable[[Any], Any] = _no_settings
  sections: Tuple[str, ...] = ()
  defaults: Optional[Callable[[], Dict[str, ml_collections.ConfigDict]]] = None
  check_section: Callable[[Any], None] = _no_check
  check: Callable[[Any], None] = _no_check
  check_devices: Callable[[Any, int], None] = _no_device_check
  model_overrides: Callable[[Any], Dict[str, Any]] = _no_overrides
  weight_decay: Callable[[Any], float] = optim_weight_decay
  make_optimizer: Callable[..., Any] = steps.make_optimizer
  results: Callable[[Any], Dict[str, Any]] = _no_results
  deployed_branch: str = 'adv'
  needs_batchnorm: bool = False
  in_default_comparison: bool = False
  auto_lr0: bool = False

  @property
  def title(self) -> str:
    """`display_name`, or `name` when it has none."""
    return self.display_name or self.name


_REGISTRY: Dict[str, Method] = {}


def _origin(method: Method) -> Tuple[str, str, str]:
  """Where a method is defined: its name and its loss's module and qualified name."""
  return method.name, getattr(method.make_loss, '__module__', ''), getattr(method.make_loss, '__qualname__', '')


def register(method: Method, *, replace: bool = False) -> Method:
  """Adds `method` to the registry under `method.name`; returns it.

  The same definition registered again (a config file that defines its method, loaded twice) replaces the
  old value; another method under a registered name is an error unless `replace`.
  """
  if not isinstance(method, Method):
    raise TypeError(f'register takes an autolora_jax.methods.Method, got {type(method).__name__}.')
  if method.deployed_branch not in ('adv', 'nat'):
    raise ValueError(f"Method {method.name!r}: deployed_branch must be 'adv' or 'nat', got "
                     f'{method.deployed_branch!r}.')
  old = _REGISTRY.get(method.name)
  if old is not None and _origin(old) != _origin(method) and not replace:
    raise ValueError(f'A method named {method.name!r} is registered already; choose another name, or pass '
                     'replace=True to replace it.')
  _REGISTRY[method.name] = method
  return method


def unregister(name: str) -> None:
  """Removes a method from the registry (tests; nothing else needs it)."""
  _REGISTRY.pop(name, None)


def names() -> Tuple[str, ...]:
  """The registered methods' names, in registration order (the built-in ones first)."""
  return tuple(_REGISTRY)


def get(name, key: str = 'config.method') -> Method:
  """The registered method `name` (a Method passes through); ConfigError naming the registered ones else.

  `key` names where the name came from, for the message (e.g. '--methods').
  """
  if isinstance(name, Method):
    return name
  method = _REGISTRY.get(name) if isinstance(name, str) else None
  if method is None:
    flag = f'--{key}' if key.startswith('config.') else key
    raise ConfigError(
        f'{key}={name!r} is not supported: choose one of {names()} (e.g. {flag}={names()[0]}), or register a '
        'method of your own with autolora_jax.methods.register in a module that your config file imports '
        '(docs/methods.md, "Writing a method of your own").')
  return method


def registered() -> List[Method]:
  """The registered methods, in registration order."""
  return list(_REGISTRY.values())


def add_config_sections(config) -> None:
  """Adds the config sections of every registered method (`Method.defaults`) that `config` lacks, at
  their defaults (configs/default.py calls it; a locked config stays locked)."""
  with config.unlocked():
    for method in registered():
      for section, value in (method.defaults() if method.defaults else {}).items():
        if section not in config:
          config[section] = value


def defined_sections(method: Method) -> Tuple[str, ...]:
  """The config sections that `method.defaults` defines."""
  return tuple(method.defaults()) if method.defaults else ()


def unread_sections(name) -> Tuple[str, ...]:
  """The registered methods' sections that method `name` does not read (all of them for an unknown name)."""
  reads = set(_REGISTRY[name].sections) if name in _REGISTRY else set()
  out = []
  for method in registered():
    out += [s for s in method.sections if s not in reads and s not in out]
  return tuple(out)


def fixed_schedule_policy(section, l1: float, l2: float) -> policy.EpochPolicy:
  """`policy.fixed_policy` over a config section's fixed lr schedule (lr, lr_schedule, epochs, boundaries,
  decay; config.fixed's keys) with constant loss scalars l1, l2."""
  s = section
  schedule = policy.fixed_lr_schedule(s.lr_schedule, s.lr, s.epochs, tuple(s.boundaries), s.decay)
  return policy.fixed_policy(schedule, s.epochs, l1, l2)
