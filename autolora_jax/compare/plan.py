"""What a comparison runs: the methods and their names, the seeds, the sweep's grid, and one `Job` (config and
workdir) per run."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from autolora_jax import methods, models
from autolora_jax.errors import ConfigError


class _Titles(Mapping):
  """Method name -> the name tables and plots give it, read from the methods registry when asked (so a
  method registered later has its title too)."""

  def __getitem__(self, name: str) -> str:
    if name not in methods.names():
      raise KeyError(name)
    return methods.get(name).title

  def __iter__(self) -> Iterator[str]:
    return iter(methods.names())

  def __len__(self) -> int:
    return len(methods.names())


METHOD_NAMES = _Titles()
# The built-in methods a comparison runs without --methods (Method.in_default_comparison).
DEFAULT_METHODS = tuple(n for n in methods.names() if methods.get(n).in_default_comparison)
SWEEP_METHOD = 'vanilla_rft'  # the baseline whose hyper-parameters the sweep varies
DEFAULT_SEEDS = (0, 1, 2)  # the comparison's; the sweep's default is one seed, SWEEP_SEEDS
SWEEP_SEEDS = (0,)
SWEEP_LRS = (0.001, 0.003, 0.01, 0.03)
SWEEP_L2S = (0.0, 1.0, 6.0)
AUTO_METHOD = 'autolora'  # the method whose initial learning rate (config.auto_lr.lr0) the sweep varies too
SWEEP_LR0S = (0.003, 0.01, 0.03, 0.1)
PRETRAIN_DIR = 'pretrain'


def default_methods(config) -> Tuple[str, ...]:
  """The registered methods a comparison runs without --methods, less those that need BatchNorms (TWINS)
  where the architecture has none (a ViT)."""
  has_batchnorm = models.spec(config.model.arch).has_batchnorm
  return tuple(n for n in methods.names() if methods.get(n).in_default_comparison
               and (has_batchnorm or not methods.get(n).needs_batchnorm))


# -- inputs ------------------------------------------------------------------------------------------------

def parse_methods(text_or_list) -> List[str]:
  """Method names (a comma list or a sequence), each a registered method (`methods.names()`); ConfigError
  otherwise."""
  names = _split(text_or_list)
  registered = methods.names()
  if not names:
    raise ConfigError(f'--methods is empty: give a comma list of methods from {registered}, e.g. '
                      '--methods=autolora,vanilla_rft.')
  unknown = [n for n in names if n not in registered]
  if unknown:
    raise ConfigError(f'Unknown method{"s" if len(unknown) > 1 else ""} {", ".join(map(repr, unknown))} in '
                      f'--methods: choose from {", ".join(registered)} (e.g. '
                      f'--methods={",".join(registered)}).')
  return unique(names)


def parse_seeds(text_or_list) -> List[int]:
  """Seeds (a comma list or a sequence) as non-negative ints; ConfigError otherwise."""
  seeds = []
  for item in _split(text_or_list):
    if isinstance(item, str) and item.isdigit():
      seeds.append(int(item))
    elif isinstance(item, (int, np.integer)) and not isinstance(item, bool) and item >= 0:
      seeds.append(int(item))
    else:
      raise ConfigError(f'--seeds takes non-negative whole numbers, e.g. --seeds=0,1,2; got {item!r}.')
  if not seeds:
    raise ConfigError('--seeds is empty: give at least one seed, e.g. --seeds=0,1,2.')
  return unique(seeds)


def parse_values(text_or_list, flag: str) -> List[float]:
  """Grid values (a comma list or a sequence) as floats; ConfigError naming `flag` otherwise."""
  values = []
  for item in _split(text_or_list):
    try:
      value = float(item)
    except ValueError:
      value = float('nan')
    if not math.isfinite(value):
      raise ConfigError(f'--{flag} takes a comma list of numbers, e.g. --{flag}=0.001,0.01; got {item!r}.')
    values.append(value)
  if not values:
    raise ConfigError(f'--{flag} is empty: give a comma list of numbers.')
  return unique(values)


def _split(text_or_list) -> list:
  if isinstance(text_or_list, str):
    return [s.strip() for s in text_or_list.split(',') if s.strip()]
  return list(text_or_list)


def unique(items: Iterable) -> list:
  """The items in their order, each once."""
  out = []
  for item in items:
    if item not in out:
      out.append(item)
  return out


def number_label(x: float) -> str:
  """A short label of a grid value for folder names and tables: 0.001 -> '0.001', 6.0 -> '6'."""
  return f'{x:g}'


def sweep_label(lr: float, l2: float) -> str:
  return f'lr{number_label(lr)}_l2{number_label(l2)}'


# -- the runs ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
  """One run: its group (a method, or a sweep point's label), seed, workdir and config."""
  group: str
  seed: int
  workdir: str
  config: object
  lr: Optional[float] = None  # sweep points only
  l2: Optional[float] = None
  lr0: Optional[float] = None  # AutoLoRa's sweep points only

  @property
  def name(self) -> str:
    return f'{self.group}/seed{self.seed}'


def run_config(config, workdir: str, method: str, seed: int, lr0: Optional[float] = None, **fixed):
  """A copy of `config` for one run: method, seed, the shared FE cache DIR/pretrain, `config.auto_lr.lr0`
  (AutoLoRa's sweep) and `config.fixed` values (the sweep's lr, l2). The original stays as it was."""
  c = copy.deepcopy(config)  # keeps field references (e.g. config.pretrained following model.arch)
  c.method = method
  c.seed = int(seed)
  c.pretrain.cache_dir = os.path.join(os.path.abspath(workdir), PRETRAIN_DIR)
  if lr0 is not None:
    c.auto_lr.lr0 = float(lr0)
  for key, value in fixed.items():
    c.fixed[key] = float(value)
  return c


def plan_comparison(config, method_names: Sequence[str], seeds: Sequence[int], workdir: str) -> List[Job]:
  """The runs of the comparison, method by method: DIR/<method>/seed<k>."""
  root = os.path.abspath(workdir)
  return [Job(m, s, os.path.join(root, m, f'seed{s}'), run_config(config, root, m, s))
          for m in method_names for s in seeds]


def plan_sweep(config, lrs: Sequence[float], l2s: Sequence[float], seeds: Sequence[int],
               workdir: str) -> List[Job]:
  """The sweep's SWEEP_METHOD runs over lrs x l2s: DIR/sweep/lr<lr>_l2<l2>/seed<k>."""
  root = os.path.abspath(workdir)
  jobs, labels = [], {}
  for lr in lrs:
    for l2 in l2s:
      label = sweep_label(lr, l2)
      if labels.setdefault(label, (lr, l2)) != (lr, l2):
        raise ConfigError(f'The sweep points (lr, l2) = {labels[label]} and {(lr, l2)} would share the same '
                          f'folder sweep/{label}: give grid values that differ in their first 6 digits.')
      for s in seeds:
        jobs.append(Job(label, s, os.path.join(root, 'sweep', label, f'seed{s}'),
                        run_config(config, root, SWEEP_METHOD, s, lr=lr, l2=l2), lr=lr, l2=l2))
  return jobs


def lr0_label(lr0: float) -> str:
  return f'{AUTO_METHOD}_lr0_{number_label(lr0)}'


def plan_lr0_sweep(config, lr0s: Sequence[float], seeds: Sequence[int], workdir: str) -> List[Job]:
  """The sweep's AUTO_METHOD runs over its initial learning rate: DIR/sweep/autolora_lr0_<lr0>/seed<k>; the lr0
  of `config` itself (a number) is the comparison's run, DIR/autolora/seed<k> (group AUTO_METHOD), not run
  twice."""
  root = os.path.abspath(workdir)
  own = config.auto_lr.lr0
  jobs, labels = [], {}
  for lr0 in lr0s:
    label = lr0_label(lr0)
    if labels.setdefault(label, lr0) != lr0:
      raise ConfigError(f'The sweep values lr0 = {labels[label]} and {lr0} would share the same folder '
                        f'sweep/{label}: give values that differ in their first 6 digits.')
    same = isinstance(own, (int, float)) and float(own) == float(lr0)
    for s in seeds:
      if same:
        jobs.append(Job(AUTO_METHOD, s, os.path.join(root, AUTO_METHOD, f'seed{s}'),
                        run_config(config, root, AUTO_METHOD, s), lr0=float(lr0)))
      else:
        jobs.append(Job(label, s, os.path.join(root, 'sweep', label, f'seed{s}'),
                        run_config(config, root, AUTO_METHOD, s, lr0=lr0), lr0=float(lr0)))
  return jobs
