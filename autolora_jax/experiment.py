"""The one reader of a run's config: what `config.method` and `config.reference_compat` mean, resolved into
plain values once, and `Experiment`, what training (train.py) and evaluation (evaluation.py) share.

Below this module nothing reads the whole config: models get a `config.model` sub-config at one boundary
(`models.create_model`), data sets a `config.dataset` one (`data.create_dataset`), the policy, the steps,
the attacks, pre-training and AutoAttack plain numbers. Nothing writes into the config either: the input
normalisation of a pre-trained checkpoint is a value of the Experiment (`normalization`), recorded in the
checkpoints' metadata, so `--mode=eval` needs neither the pre-trained file nor a changed config.

Methods: `config.method` names a registered `methods.Method` (autolora_jax/methods/: 'autolora',
'vanilla_rft', 'pgd_at', 'twins', 'lora_at', or one of the user's own); the functions below read its model
overrides, weight decay, settings and epoch policy from it.

`config.reference_compat = True` reproduces the authors' public code where it differs from the paper
(docs/method.md, "Where the public code differs"); every item is applied here:
  item 1  LoRa only in the last block of each stage, never on the shortcut   `methods.autolora`
  item 2  scalars from the training split with training augmentation,        `methods.autolora`,
          not recomputed after a reload                                      `train_split_batches`
  item 3  the scheduler's condition 2 degenerates                            `methods.autolora`
  item 5  eps 0.0314 instead of 8/255 (PGD and AutoAttack)                   `attack_settings`
  item 6  KL divided by the configured batch size                            `kl_denominator`
  items 4 and 7 (the DTD and Caltech-256 splits and heads)                   `data.create_dataset`
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
from typing import Dict, Iterator, NamedTuple, Optional, Tuple

import jax
import numpy as np

from autolora_jax import (
  checkpoints,
  config_checks,
  convert,
  corruptions,
  distributed,
  loop,
  methods,
  models,
  ops,
  policy,
  pretrain,
  steps,
)
from autolora_jax import data as datasets
from autolora_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def __getattr__(name):
  """METHODS: the registered methods' names (`methods.names()`), read when asked."""
  if name == 'METHODS':
    return methods.names()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# Item 5: the public code's attack defaults, the paper's 8/255 and 2/255 rounded to four and five
# decimals (its --epsilon 0.0314 and --alpha 0.00784; AutoAttack is also called with eps=0.0314).
PAPER_EPS, PAPER_STEP_SIZE = 8 / 255, 2 / 255
REFERENCE_EPS, REFERENCE_STEP_SIZE = 0.0314, 0.00784


class Attack(NamedTuple):
  """The PGD a run uses, in [0, 1] pixel units: norm 'linf' or 'l2' (eps and step_size L2 lengths then)."""
  eps: float
  step_size: float
  train_steps: int
  eval_steps: int
  norm: str = 'linf'


class AutoAttackSettings(NamedTuple):
  """AutoAttack at the end of a run: version, `num_points` test points (0: all) chosen as `points` says
  ('stratified' by class with `seed`, or the 'first'; sampling.sample_points), batch, seed, eps, norm
  ('Linf', 'L2' or 'L1')."""
  enabled: bool
  version: str
  num_points: int
  batch_size: int
  seed: int
  eps: float
  norm: str = 'Linf'
  attacks: Tuple[str, ...] = ()  # version 'custom'
  points: str = 'stratified'


Twins = methods.twins.Twins  # TWINS's loss, lam, beta


Normalization = Tuple[Optional[Tuple[float, ...]], Optional[Tuple[float, ...]]]  # (mean, std), or Nones


# -- the config, resolved ---------------------------------------------------------------------------------

def start(config) -> None:
  """What every entry point does first, before anything expensive: validates the config, joins a
  multi-process job (jax.distributed, config.distributed) and checks every batch against its devices."""
  config_checks.validate(config)
  distributed.initialize(config.distributed)
  config_checks.check_devices(config, jax.device_count(), jax.process_count())


def attack_settings(config) -> Attack:
  """The attack of the run: `config.attack`, with item 5 applied under `reference_compat`.

  With reference_compat, the paper's eps 8/255 becomes 0.0314 and its step 2/255 becomes 0.00784;
  any other configured value is the user's explicit choice and is kept.
  """
  a = config.attack
  eps, step_size = float(a.eps), float(a.step_size)
  norm = str(a.get('norm', 'linf'))
  if config.reference_compat and norm == 'linf':
    # Item 5: eps = 0.0314 instead of 8/255 (and the step 0.00784 instead of 2/255).
    if math.isclose(eps, PAPER_EPS, rel_tol=1e-9):
      eps = REFERENCE_EPS
    if math.isclose(step_size, PAPER_STEP_SIZE, rel_tol=1e-9):
      step_size = REFERENCE_STEP_SIZE
  return Attack(eps, step_size, int(a.train_steps), int(a.eval_steps), norm)


def effective_eps(config) -> float:
  """The eps every attack of the run uses, PGD and AutoAttack alike (item 5 under reference_compat)."""
  return attack_settings(config).eps


def autoattack_settings(config) -> AutoAttackSettings:
  """config.autoattack with eps 0 = the run's PGD eps and norm 'auto' = the training attack's."""
  c = config.autoattack
  eps = float(c.get('eps', 0.0)) or float(effective_eps(config))  # reference_compat: 0.0314, as for PGD
  return AutoAttackSettings(bool(c.enabled), str(c.version), int(c.num_points), int(c.batch_size), int(c.seed),
                            eps, config_checks.autoattack_norm(config), tuple(c.get('attacks', ())),
                            str(c.get('points', 'first')))


def method_of(config) -> methods.Method:
  """The registered method that `config.method` names (ConfigError for an unknown name)."""
  return methods.get(config.method)


def twins_settings(config) -> Optional[Twins]:
  """`config.twins`'s loss for method 'twins'; None for the other methods."""
  settings = method_of(config).settings(config)
  return settings if isinstance(settings, Twins) else None


def weight_decay(config) -> float:
  """The optimizer's coupled weight decay: the method's (config.twins.weight_decay for TWINS, its scripts'
  own; config.optim.weight_decay for the other built-in methods)."""
  return float(method_of(config).weight_decay(config))


def model_overrides(config) -> Dict[str, object]:
  """Keyword overrides of `models.create_model` for the method (and its reference_compat items)."""
  return method_of(config).model_overrides(config)


def build_model(model_config, num_classes: int, normalization: Optional[Normalization] = None, **overrides):
  """The one model builder of a run (fine-tuning and pre-training): `config.model` with `overrides`, its
  convolutions those `config.model.conv_impl` chooses for this process's default backend (asked once,
  here), normalising with `normalization` (mean, std) instead of model_config.mean/std when it is given."""
  if normalization is not None:
    overrides = {'mean': normalization[0], 'std': normalization[1], **overrides}
  conv_fn, pool_fn = ops.convolutions(model_config.conv_impl, jax.default_backend())
  return models.create_model(model_config, num_classes, conv_fn=conv_fn, pool_fn=pool_fn, **overrides)


def create_model(config, num_classes: int, normalization: Optional[Normalization] = None):
  """The fine-tuning model of a run: `config.model` with `model_overrides` applied."""
  return build_model(config.model, num_classes, normalization, **model_overrides(config))


def kl_denominator(config, device_count: int) -> Optional[float]:
  """The per-device KL denominator for `steps.make_train_step`; None divides by the actual batch (paper).

  Item 6: the public code divides the KL sum of a batch by the configured batch size B, also for the
  short last batch of an epoch. Under pmap each of the n devices divides its own KL sum by d and the
  gradients are averaged over the devices, so an example's KL weight is 1 / (n * d): d = B / n gives
  the public code's 1 / B for every batch, full or short.
  """
  if not config.reference_compat:
    return None
  return config.batch_size / device_count  # item 6


def create_policy(config) -> policy.EpochPolicy:
  """The epoch policy of `config.method` (`Method.policy`): `policy.autolora_policy` for 'autolora',
  `policy.fixed_policy` over config.fixed for vanilla RFT and PGD-AT (l1 = l2 = 0), over config.twins for
  TWINS, over config.lora_at for LoRa-AT."""
  return method_of(config).policy(config)


def lr0_probe(config) -> Optional[Tuple[Tuple[float, ...], int]]:
  """(config.auto_lr.lr0_candidates, config.auto_lr.probe_steps) when config.auto_lr.lr0 is 'auto' (a method
  with `Method.auto_lr0`; config_checks refuses the others), else None."""
  if 'auto_lr' not in config or not methods.autolora.is_auto(config.auto_lr.lr0):
    return None
  s = config.auto_lr
  return tuple(float(c) for c in s.lr0_candidates), int(s.probe_steps)


def pretrain_fingerprint(config) -> dict:
  """Everything the in-process pre-trained FE is a function of (JSON data): the model, the pre-training
  settings and data, the attack and the optimizer; not config.seed (the FE has its own, pretrain.seed)."""
  pc = config.pretrain.to_dict()
  pc.pop('cache_dir', None)
  # Keys added since FEs were first cached, at the values every earlier FE had: dropped, the same cache.
  attack = config.attack.to_dict()
  if attack.get('norm') == 'linf':
    attack.pop('norm')
  model = config.model.to_dict()
  if model.get('precision') == 'default':
    model.pop('precision')
  return json.loads(json.dumps({'model': model, 'pretrain': pc, 'attack': attack, 'optim': config.optim.to_dict()},
                               sort_keys=True, default=list))


def pretrain_folder(config, workdir: str) -> str:
  """The folder of this config's pre-trained FE: CACHE/<16 hex digits of its fingerprint's hash>, CACHE
  being config.pretrain.cache_dir or workdir/pretrain."""
  base = config.pretrain.cache_dir or os.path.join(workdir, 'pretrain')
  digest = hashlib.sha256(json.dumps(pretrain_fingerprint(config), sort_keys=True).encode()).hexdigest()[:16]
  return os.path.abspath(os.path.join(os.path.expanduser(base), digest))


def pretrain_plan(config, workdir: str) -> pretrain.PretrainPlan:
  """The in-process PGD-AT pre-training of `config.pretrain` (the configured attack as given: the FE is
  the same for every method and for reference_compat)."""
  pc, a, o = config.pretrain, config.attack, config.optim
  return pretrain.PretrainPlan(
      data_config=pc.dataset, seed=int(pc.seed), epochs=int(pc.epochs), batch_size=int(pc.batch_size),
      learning_rate=float(pc.learning_rate), momentum=float(o.momentum), weight_decay=float(o.weight_decay),
      eps=float(a.eps), step_size=float(a.step_size), attack_steps=int(a.train_steps),
      attack_norm=str(a.get('norm', 'linf')), input_size=int(config.model.input_size),
      make_model=functools.partial(build_model, config.model, lora_rank=0), folder=pretrain_folder(config, workdir),
      fingerprint=pretrain_fingerprint(config))


def configured_normalization(model_config) -> Normalization:
  """`config.model`'s (mean, std) as tuples (or Nones)."""
  as_tuple = lambda v: tuple(v) if v is not None else None  # noqa: E731
  return as_tuple(model_config.mean), as_tuple(model_config.std)


def resolve_normalization(model_config, meta: dict, source: str) -> Normalization:
  """The input normalisation a pre-trained checkpoint expects (its `meta`), which the fine-tuning model must
  apply; model_config.mean/std when they agree with it (logged when they do not)."""
  mean = tuple(meta['mean']) if meta.get('mean') is not None else None
  std = tuple(meta['std']) if meta.get('std') is not None else None
  configured = configured_normalization(model_config)

  def same(a, b):
    return (a is None) == (b is None) and (a is None or np.allclose(a, b, rtol=0, atol=1e-6))

  if same(mean, configured[0]) and same(std, configured[1]):
    return configured
  log.info('Input normalisation of %s used: mean %s, std %s (config.model: %s, %s).', source, mean, std,
           *configured)
  return mean, std


def train_split_batches(dataset, epoch: int, global_batch: int) -> Iterator[Dict[str, np.ndarray]]:
  """The training split as masked evaluation batches, with the training augmentation (item 2).

  The public code measures the natural branch's accuracy behind l1/l2 on its training loader: a fresh
  shuffle with the training augmentation, evaluation mode. The batches are the data set's training
  batches of `epoch` (drop-remainder: the last partial batch is not measured) with an all-ones mask.
  """
  for batch in dataset.train_batches(epoch, global_batch):
    yield {**batch, 'mask': np.ones(batch['label'].shape, np.float32)}


def train_split_batch_size(num_train: int, eval_batch: int, train_batch: int) -> int:
  """The global batch for `train_split_batches`: the evaluation batch if the split holds one, else the
  training batch (the run has checked that the split holds at least one of those)."""
  return eval_batch if num_train >= eval_batch else train_batch


# -- what training and evaluation share ---------------------------------------------------------------------

class Experiment:
  """One run's data, model, compiled steps and policy, built from a validated config in `workdir`.

  Attributes (plain values once built): method (the name), method_def (the registered `methods.Method`),
  settings (the method's, `Method.settings`), twins (TWINS's settings or None), seed, reference_compat,
  dataset_name, batch_size, eval_batch_size, progress, tensorboard, metrics_every, prefetch and plot_every
  (config.host), is_chief, attack, kl_denominator, autoattack, val_attacks (config.eval.val_attacks),
  normalization, data, model, tx (the method's
  optimizer), policy, lr0_probe (`lr0_probe`), steps_per_epoch, and the pmapped p_train_step, p_eval_step, p_eval_clean.

  Args:
    normalization: the (mean, std) the model applies; None: config.model's, or the pre-trained
      checkpoint's (`config.pretrained`, read here, before any model is built).
    load_fe: whether `initial_state` transplants the pre-trained FE (False for `--mode=eval`, which
      restores every variable from the workdir's checkpoints).
  """

  def __init__(self, config, workdir: str, *, normalization: Optional[Normalization] = None,
               load_fe: bool = True):
    self.workdir = workdir
    self.method = config.method
    self.seed = int(config.seed)
    self.reference_compat = bool(config.reference_compat)
    self.dataset_name = config.dataset.name
    self.batch_size = int(config.batch_size)
    self.eval_batch_size = int(config.eval_batch_size)
    self.is_chief = jax.process_index() == 0
    self.progress = bool(config.progress) and self.is_chief
    self.tensorboard = bool(config.tensorboard) and self.is_chief
    host = config.host
    self.metrics_every, self.prefetch = int(host.metrics_every), int(host.prefetch)
    self.plot_every = int(host.plot_every)
    self.data = datasets.create_dataset(config.dataset, seed=self.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count(), reference_compat=self.reference_compat,
                                    threads=host.decode_threads or None)
    self.steps_per_epoch = self.data.steps_per_epoch(self.batch_size)
    if self.steps_per_epoch < 1:
      raise DataError(
          f'The training split of {self.dataset_name} has {self.data.num_examples("train")} examples, fewer '
          f'than one batch of config.batch_size={self.batch_size}: lower the batch size.')
    if self.data.num_examples('validation') < 1:
      raise ConfigError(f'config.dataset.val_fraction={config.dataset.val_fraction} leaves no '
                             'validation example: the schedule and the loss scalars need one. Raise it.')
    # config.eval's common corruptions (corruptions.Settings); images too small for them fail here, untrained.
    self.corruptions = corruptions.settings(config, self.data, self.eval_batch_size)
    self._plan = None
    if load_fe and config.pretrain.epochs > 0:  # its data loads later, after the model: check its classes now
      datasets.check_class_selection(config.pretrain.dataset, key='config.pretrain.dataset')
      self._plan = pretrain_plan(config, workdir)
    # Read before the model is built: a bad checkpoint fails early, and its input normalisation is the model's.
    self._pretrained = None
    if load_fe and config.pretrained:
      m = config.model
      self._pretrained = pretrain.load_pretrained(config.pretrained, m.arch, m.stem, m.width)
      if normalization is None:
        normalization = resolve_normalization(m, self._pretrained[1], config.pretrained)
    self.normalization = normalization or configured_normalization(config.model)
    self.model = create_model(config, self.data.num_classes, normalization)  # the method's overrides
    self.input_size = int(config.model.input_size)
    self.arch = convert.arch_for(config.model.arch, config.model.stem)  # e.g. 'resnet18', 'vit_b16_convstem'
    self.method_def = m = method_of(config)
    self.tx = m.make_optimizer(methods.autolora.initial_lr(config), config.optim.momentum, weight_decay(config))
    self.policy = create_policy(config)  # lr, scalars, best checkpoint and stop, per method
    self.lr0_probe = lr0_probe(config)  # lr0='auto': (candidates, probe steps) of lr_probe.run; else None
    self.attack = a = attack_settings(config)  # reference_compat: eps 0.0314
    self.autoattack = autoattack_settings(config)
    self.val_attacks = tuple(config.eval.get('val_attacks', ()))  # recorded after each validation
    self.kl_denominator = kl_denominator(config, jax.device_count())
    self.settings = m.settings(config)  # the method's own, e.g. TWINS's loss, lam and beta
    self.twins = twins_settings(config)  # None unless method 'twins'
    self.p_train_step = loop.pmap_train_step(steps.make_train_step(
        self.model, method=m, eps=a.eps, step_size=a.step_size, steps=a.train_steps, norm=a.norm,
        kl_denominator=self.kl_denominator, settings=self.settings, remat=config.model.get('remat', 'none')))
    self.p_eval_step = loop.pmap_eval_step(steps.make_eval_step(
        self.model, eps=a.eps, step_size=a.step_size, steps=a.eval_steps, norm=a.norm, branch=m.deployed_branch))
    self.p_eval_clean = loop.pmap_eval_step(steps.make_eval_step(
        self.model, eps=a.eps, step_size=a.step_size, steps=a.eval_steps, attack=False, norm=a.norm,
        branch=m.deployed_branch))
    self._template = None

  # -- state -------------------------------------------------------------------------------------------

  def template(self) -> steps.TrainState:
    """An unreplicated TrainState with fresh variables (the shape Orbax restores into); made once."""
    if self._template is None:  # initialising compiles a program: do it once per run
      variables = pretrain.init_variables(self.model, self.input_size, self.seed)
      self._template = steps.create_train_state(self.model, variables, self.tx)
    return self._template

  def initial_state(self) -> steps.TrainState:
    """Fresh fine-tuning variables with the pre-trained FE transplanted in (if the config gives one)."""
    state = self.template()
    if self._plan is not None:
      fe = pretrain.pretrain_in_process(self._plan, progress=self.progress)
    elif self._pretrained is not None:
      fe = self._pretrained[0]
    else:
      fe = None
    self._pretrained = None  # copied into the state below; free the host copy
    if fe is not None:
      variables, report = pretrain.transplant(fe, {'params': state.params, 'batch_stats': state.batch_stats})
      log.info('Pre-trained FE: %d arrays copied; not used: %s', report['copied'], report['unused'])
      state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'])
    return state

  def checkpoint_meta(self) -> dict:
    """What every checkpoint of the run records besides its epoch: the input normalisation (JSON)."""
    mean, std = self.normalization
    return {'normalization': {'mean': list(mean) if mean is not None else None,
                              'std': list(std) if std is not None else None}}

  def save_best(self, ckpts: checkpoints.Checkpoints, state, epoch: int, val: dict) -> None:
    variables = checkpoints.host_copy({'params': state.params, 'batch_stats': state.batch_stats}, True)
    ckpts.save('best', epoch, variables, {'epoch': epoch, 'val': val, **self.checkpoint_meta()})

  @staticmethod
  def restore_best(ckpts: checkpoints.Checkpoints, state, if_lost: str):
    """Replaces params and BN statistics of a replicated state by the best checkpoint's (the optimizer
    state stays); returns (state, best metadata). A best checkpoint that cannot be read is moved aside with
    a warning that ends in `if_lost` (what the caller does instead); then (state unchanged, None)."""
    template = checkpoints.host_copy({'params': state.params, 'batch_stats': state.batch_stats}, True)
    restored = ckpts.restore('best', template, if_lost=if_lost)
    if restored is None:
      return state, None
    variables = loop.replicate(restored[0])
    return state.replace(params=variables['params'], batch_stats=variables['batch_stats']), restored[1]

  # -- evaluation --------------------------------------------------------------------------------------

  def evaluate(self, state, split: str, attack: bool = True, desc: Optional[str] = None) -> dict:
    """Accuracies (fractions) of a replicated state on a split: clean_adv, clean_nat and, with attack, pgd."""
    gb = self.eval_batch_size
    return loop.evaluate(self.p_eval_step if attack else self.p_eval_clean, state,
                         self.data.eval_batches(split, gb), total=self.data.num_examples(split),
                         global_batch=gb, progress=self.progress, desc=desc or split)

  def measure(self, state, epoch: int, attack: bool = True, desc: str = 'validation') -> dict:
    """The validation accuracies the policy decides on; with `policy.needs_train_accuracy` (reference_compat,
    item 2) also 'train_split_clean_nat': the natural branch on the augmented training split."""
    val = self.evaluate(state, 'validation', attack=attack, desc=desc)
    if self.policy.needs_train_accuracy:
      gb = train_split_batch_size(self.data.num_examples('train'), self.eval_batch_size, self.batch_size)
      acc = loop.evaluate(self.p_eval_clean, state, train_split_batches(self.data, epoch, gb),
                          total=self.data.steps_per_epoch(gb) * gb, global_batch=gb, progress=self.progress,
                          desc=f'{desc}: training split')
      val['train_split_clean_nat'] = acc['clean_nat']
    return val

  def compile_ahead(self, state) -> None:
    """Multi-process: compiles the train and eval steps on every process before any of them runs."""
    if jax.process_count() == 1:
      return
    train_batch = loop.shard(next(self.data.train_batches(1, self.batch_size)))
    eval_batch = loop.shard(next(self.data.eval_batches('validation', self.eval_batch_size)))
    distributed.compile_ahead([(self.p_train_step, (state, train_batch, loop.step_rng(0, 1, 0))),
                               (self.p_eval_step, (state, eval_batch)),
                               (self.p_eval_clean, (state, eval_batch))])

  def close(self) -> None:
    self.data.close()  # the decoding threads of the image data sets (nothing for the in-memory ones)


def normalization_of(meta: Optional[dict]) -> Optional[Normalization]:
  """The (mean, std) a checkpoint's metadata records (`Experiment.checkpoint_meta`); None if it has none."""
  n = (meta or {}).get('normalization')
  if n is None:
    return None
  as_tuple = lambda v: tuple(float(x) for x in v) if v is not None else None  # noqa: E731
  return as_tuple(n['mean']), as_tuple(n['std'])

