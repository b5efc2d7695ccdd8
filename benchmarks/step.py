r"""Times our AutoLoRa steps after compilation and, where torch is installed, the PyTorch reference step.

    python -m benchmarks.step --arch=resnet18 --resolution=224 --batch=32 --json=OUT.json

For every (arch, resolution, batch) in the comma-separated flags and every part in --parts:

Architectures: resnet18, resnet50 (the paper's) and vit_s16, vit_b16 (timm's ViT-S/16, ViT-B/16 with LoRa on
q, k, v, proj, fc1, fc2; their reference is torch_reference.ViT, attention by F.scaled_dot_product_attention),
convnext_t/s/b/l and swin_t/s/b/l (timm's layouts; LoRa on fc1, fc2 and on q, k, v, proj, fc1, fc2; their
references are in torch_convnext_swin.py); --dim, --depths, --heads and --window shrink them for a quick run:

    python -m benchmarks.step --arch=convnext_t,swin_t --resolution=224 --batch=32 --json=OUT.json

* train: the AutoLoRa train step (PGD-`pgd_steps` with a random start, natural and adversarial forward,
  one update), `steps.make_train_step` jitted on one device with the state donated (`--remat=forwards`:
  the two forwards recomputed in turn in the backward pass, config.model.remat); against
  `torch_reference.AutoLoRaStep` (the authors' public code's step);
* eval: the validation pass on one batch (clean accuracy of both branches, PGD-`pgd_steps` without random
  start, the adversarial forward on its output), `steps.make_eval_step`; against `torch_reference.eval_step`;
* autoattack: `autolora_jax.autoattack.run` (version --aa_version) on `--aa_images` images of the randomly
  initialised model, labelled with its own predictions so that the cascade attacks every point, per
  image (its "compile" time is the first call, compilation included); no reference. A random model's
  points break at once: benchmarks/autoattack_speed.py times AutoAttack on a trained model.

Ours and the reference run in one process and alternate repetitions, so that both see the same machine
load; the reported images per second are medians over `--reps` repetitions after one warm-up call.
`--threads=N` pins the process (both implementations) to N cores: where other processes oversubscribe
the cores, the reference's OpenMP threads lose far more time waiting for each other than ours do, and one
core gives the steadier comparison. Inputs are `resolution` x `resolution` images; the model resizes them
to `--input_size` (default: the resolution, i.e. no resize) inside itself, as the authors' model does.

Reported per case (table on stdout, list under "cases" in the JSON): ours_img_per_s, torch_img_per_s,
ratio (ours / torch), compile time, the peak memory of one call (the rise of the bytes malloc has handed
out while it runs, sampled every 5 ms, over their settled count before it; on GPUs the devices' own peak
counters), the model FLOPs per image and the achieved FLOP/s (with --peak_flops, the model FLOP
utilisation, MFU). FLOPs count the convolutions and matmuls (the head, a ViT's dense layers and attention;
2 per multiply-add) of one forward pass, F, and charge a training image (2 * pgd_steps + 6) * F (PGD:
forward + input gradient per step; natural and adversarial pass: forward + input and weight gradients) and
a validation image (2 * pgd_steps + 3) * F. --torch_autocast and --torch_matmul_precision set the reference's precision
(benchmarks/gpu.sh compares TF32 with TF32 and bfloat16 with autocast on GPUs).

The process runs with host.retain_freed_memory() and host.set_xla_cpu_flags() (as run.py does;
--noretain_freed_memory and --noxla_cpu_flags to compare).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags

from autolora_jax import autoattack, models, ops, pretrain, remat, steps  # noqa: E402
from autolora_jax.ops import host  # noqa: E402
from benchmarks import memory

try:
  import torch  # noqa: E402

  from benchmarks import torch_convnext_swin, torch_reference  # noqa: E402
  REFERENCES = {**torch_reference.ARCHITECTURES, **torch_convnext_swin.ARCHITECTURES}
except ImportError:  # torch is optional
  torch = None
  torch_reference = torch_convnext_swin = None
  REFERENCES = {}

FLAGS = flags.FLAGS
flags.DEFINE_list('arch', ['resnet18'], 'Architectures: resnet18, resnet50, vit_s16, vit_b16, convnext_t/s/b/l, '
                  'swin_t/s/b/l.')
flags.DEFINE_list('resolution', ['224'], 'Input image sides, e.g. 32,224.')
flags.DEFINE_list('batch', ['32'], 'Batch sizes.')
flags.DEFINE_list('parts', ['train', 'eval', 'autoattack'], 'What to time: train, eval, autoattack.')
flags.DEFINE_integer('input_size', 0, 'Side the model resizes its inputs to; 0 = the resolution.')
flags.DEFINE_enum('stem', 'imagenet', ['imagenet', 'cifar'], 'ResNet stem (ViTs: the patch embedding).')
flags.DEFINE_integer('width', 64, 'Channels of the first stage (64 = the real networks).')
flags.DEFINE_integer('dim', 0, 'ConvNeXts and Swins: the first stage\'s width; 0 = the architecture\'s own.')
flags.DEFINE_list('depths', [], 'ConvNeXts and Swins: blocks per stage (four); empty = the architecture\'s own.')
flags.DEFINE_integer('heads', 0, 'Swins: heads of the first stage; 0 = the architecture\'s own.')
flags.DEFINE_integer('window', 0, 'Swins: the attention window; 0 = 7, the architecture\'s own.')
flags.DEFINE_integer('lora_rank', 8, 'LoRa rank.')
flags.DEFINE_integer('num_classes', 10, 'Outputs of the head.')
flags.DEFINE_integer('pgd_steps', 10, 'PGD steps of the train step and of the validation pass.')
flags.DEFINE_enum('remat', 'none', list(remat.MODES), "Our train step's config.model.remat: 'forwards' "
                  'recomputes the loss\'s forward passes one at a time in the backward pass (autolora_jax/remat.py).')
flags.DEFINE_integer('reps', 5, 'Timed repetitions per implementation (after one warm-up call).')
flags.DEFINE_string('conv_impl', 'auto', "Our model's conv_impl: auto | native | im2col | "
                    '(whatever ops.CONV_IMPLS offers).')
flags.DEFINE_string('dtype', 'float32', "Our model's compute dtype: float32 | bfloat16.")
flags.DEFINE_enum('attention_impl', 'auto', list(models.ATTENTION_IMPLS),
                  "ViTs' and Swins' attention (config.model.attention_impl): auto (the einsums on CPUs, "
                  'jax.nn.dot_product_attention elsewhere) | einsum | xla | cudnn.')
flags.DEFINE_enum('torch', 'auto', ['auto', 'off'], "'off' times ours alone.")
flags.DEFINE_enum('torch_autocast', 'off', ['off', 'bfloat16', 'float16'],
                  'Run the reference under torch.autocast in this dtype (ours: --dtype).')
flags.DEFINE_enum('torch_matmul_precision', 'highest', ['highest', 'high', 'medium'],
                  "torch.set_float32_matmul_precision for the reference: 'high' lets float32 matrix products "
                  "use TF32 on GPUs, as JAX's default precision does there.")
flags.DEFINE_bool('torch_channels_last', False, 'Run the reference in channels_last memory format '
                  "(the authors' code does not).")
flags.DEFINE_string('aa_version', 'standard', 'AutoAttack version for the autoattack part.')
flags.DEFINE_float('aa_eps', 8 / 255, 'Linf budget of the autoattack part. A random model labelled by its own '
                   'predictions loses most points at 8/255 in the first attack; at a budget of a fraction of '
                   '1/255 most survive, and every attack runs on them (the most work the cascade can do).')
flags.DEFINE_integer('aa_images', 0, 'Images for the autoattack part; 0 = the batch size.')
flags.DEFINE_integer('threads', 0, 'Pin the process to this many cores (both implementations use them); '
                     '0 = all. On a shared, loaded machine 1 gives the steadier comparison.')
flags.DEFINE_bool('retain_freed_memory', True, 'host.retain_freed_memory() for the whole process (both '
                  'implementations), as run.py does.')
flags.DEFINE_bool('xla_cpu_flags', True, 'host.set_xla_cpu_flags() (XLA\'s own CPU convolution kernels), '
                  'as run.py does; --noxla_cpu_flags to compare.')
flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s of the machine in the compute dtype, for the model FLOP '
                   'utilisation (MFU: achieved model FLOP/s over the peak); 0 = none.')
flags.DEFINE_string('json', '', 'Write the results here as JSON.')
flags.DEFINE_integer('seed', 0, 'Seed of the inputs and the initial weights.')

EPS, STEP_SIZE = 8 / 255, 2 / 255


# ----------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------

def _loadavg() -> List[float]:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return []


def forward_flops(model, variables, input_size: int) -> float:
  """FLOPs (2 per multiply-add) of the convolutions and dots of one forward pass on one image."""
  plain = {'pool_fn': models.native_max_pool} if isinstance(model, models.ResNet) else {}
  native = model.clone(conv_fn=models.native_conv2d, dtype=jnp.float32, **plain)
  x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: native.apply(v, x))(variables, x)
  total = 0.0

  def walk(jxp):
    nonlocal total
    for eqn in jxp.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
        total += 2.0 * np.prod(out) * np.prod(kernel[:-1])
      elif eqn.primitive.name == 'dot_general':
        lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        (contract, _), _ = eqn.params['dimension_numbers']
        total += 2.0 * np.prod(out) * np.prod([lhs[i] for i in contract])
      for param in eqn.params.values():
        sub = getattr(param, 'jaxpr', None)
        if sub is not None:
          walk(getattr(sub, 'jaxpr', sub))

  walk(jaxpr.jaxpr)
  return total


def _gpu() -> bool:
  return jax.default_backend() == 'gpu'


# ----------------------------------------------------------------------------------------------------------
# The implementations: each `setup` returns (call, info); call() runs one batch and waits for it
# ----------------------------------------------------------------------------------------------------------

def _sizes(arch: str) -> dict:
  """--dim, --depths, --heads, --window as the attributes of a ConvNeXt or Swin (none for the others)."""
  depths = tuple(int(d) for d in FLAGS.depths)
  if arch.startswith('convnext'):
    return {**({'dims': tuple(FLAGS.dim * 2 ** i for i in range(4))} if FLAGS.dim else {}),
            **({'depths': depths} if depths else {})}
  if arch.startswith('swin'):
    return {k: v for k, v in (('dim', FLAGS.dim), ('depths', depths), ('heads', FLAGS.heads),
                              ('window', FLAGS.window)) if v}
  return {}


def ours(part: str, arch: str, resolution: int, input_size: int, batch: int, data) -> tuple:
  conv_fn, pool_fn = ops.convolutions(FLAGS.conv_impl, jax.default_backend())
  common = dict(lora_rank=FLAGS.lora_rank, input_size=input_size, conv_fn=conv_fn, dtype=jnp.dtype(FLAGS.dtype))
  spec = models.spec(arch)
  stem = FLAGS.stem if FLAGS.stem in spec.stems else spec.stems[0]
  # What models.create_model reads from config.model for this family (a ConvNeXt's depthwise convolutions,
  # a ViT's or Swin's attention, a ResNet's width), from this benchmark's settings.
  settings = ml_collections.ConfigDict({'conv_impl': FLAGS.conv_impl, 'attention_impl': FLAGS.attention_impl,
                                        'width': FLAGS.width, 'lora_placement': 'all'})
  model = spec.build(FLAGS.num_classes, stem=stem, pool_fn=pool_fn,
                     **{**spec.attributes(settings), **common, **_sizes(arch)})
  x, y = data
  variables = pretrain.init_variables(model, input_size, FLAGS.seed)
  info = {'flops_per_forward': forward_flops(model, variables, input_size)}
  if part == 'autoattack':
    n = FLAGS.aa_images or batch
    logits_fn = jax.tree_util.Partial(lambda v, z: model.apply(v, z, branch='adv', train=False), variables)
    xa = jnp.asarray(x[:n])
    ya = jnp.argmax(logits_fn(xa), -1)  # labels = the model's predictions: every point starts robust

    def call():
      result = autoattack.run(logits_fn, xa, ya, eps=FLAGS.aa_eps, version=FLAGS.aa_version, seed=FLAGS.seed,
                              batch_size=n, progress=False, sanity_checks=False)
      jax.block_until_ready(result.x_adv)
      info['robust_points'] = int(np.sum(np.asarray(result.robust)))

    t0 = time.perf_counter()
    call()  # compiles inside
    info['compile_s'] = time.perf_counter() - t0
    info['images'] = n
    return call, info

  tx = steps.make_optimizer(0.01, 0.9, 1e-4)
  state = steps.create_train_state(model, variables, tx, l1=0.5, l2=3.0)
  batch_d = {'image': jnp.asarray(x), 'label': jnp.asarray(y), 'index': jnp.arange(batch, dtype=jnp.int32),
             'mask': jnp.ones((batch,), jnp.float32)}
  if part == 'train':
    fn = steps.make_train_step(model, method='autolora', eps=EPS, step_size=STEP_SIZE,
                               steps=FLAGS.pgd_steps, axis_name=None, remat=FLAGS.remat)
    jitted = jax.jit(fn, donate_argnums=(0,))
    args = (state, {k: batch_d[k] for k in ('image', 'label', 'index')}, jax.random.PRNGKey(1))
  else:
    fn = steps.make_eval_step(model, eps=EPS, step_size=STEP_SIZE, steps=FLAGS.pgd_steps, attack=True,
                              axis_name=None)
    jitted = jax.jit(fn)
    args = (state, batch_d)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  info['compile_s'] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  if mem is not None:
    info['xla_bytes'] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                            - mem.alias_size_in_bytes)
  holder = {'state': state}

  def call():
    if part == 'train':
      holder['state'], metrics = compiled(holder['state'], args[1], args[2])
    else:
      metrics = compiled(holder['state'], args[1])
    jax.block_until_ready(metrics)

  return call, info


def reference(part: str, arch: str, resolution: int, input_size: int, batch: int, data) -> tuple:
  if part == 'autoattack':
    return None, {'skipped': 'no PyTorch AutoAttack reference'}
  torch.manual_seed(FLAGS.seed)
  device = 'cuda' if (_gpu() and torch.cuda.is_available()) else 'cpu'
  sizes = {'dim': FLAGS.dim, 'depths': [int(d) for d in FLAGS.depths], 'heads': FLAGS.heads, 'window': FLAGS.window}
  model = REFERENCES[arch](FLAGS.num_classes, width=FLAGS.width, lora_rank=FLAGS.lora_rank, input_size=input_size,
                           stem=FLAGS.stem, **(sizes if arch in torch_convnext_swin.ARCHITECTURES else {})).to(device)
  x = torch_reference.to_nchw(data[0]).to(device)
  y = torch.from_numpy(data[1].astype(np.int64)).to(device)
  if FLAGS.torch_channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
  torch.set_float32_matmul_precision(FLAGS.torch_matmul_precision)
  autocast = ((lambda: torch.autocast(device_type=device, dtype=getattr(torch, FLAGS.torch_autocast)))
              if FLAGS.torch_autocast != 'off' else contextlib.nullcontext)
  if part == 'train':
    step = torch_reference.AutoLoRaStep(model, steps=FLAGS.pgd_steps, eps=EPS, step_size=STEP_SIZE)

    def call():
      with autocast():
        step(x, y)
      sync()
  else:
    def call():
      with autocast():
        torch_reference.eval_step(model, x, y, eps=EPS, step_size=STEP_SIZE, steps=FLAGS.pgd_steps)
      sync()

  return call, {'device': device, 'threads': torch.get_num_threads()}


def _measure_memory(call: Callable, which: str) -> Dict[str, int]:
  """Runs call() once (the warm-up) and returns its peak memory."""
  if _gpu():
    if which == 'ours':
      call()
      stats = jax.devices()[0].memory_stats() or {}
      return {'peak_bytes': int(stats.get('peak_bytes_in_use', 0))}
    torch.cuda.reset_peak_memory_stats()
    call()
    return {'peak_bytes': int(torch.cuda.max_memory_allocated())}
  with memory.PeakMemory() as mem:
    call()
  return {'peak_bytes': int(mem.rise)}


def run_case(part: str, arch: str, resolution: int, batch: int) -> Dict:
  input_size = FLAGS.input_size or resolution
  rng = np.random.RandomState(FLAGS.seed)
  data = (rng.rand(batch, resolution, resolution, 3).astype(np.float32),
          rng.randint(0, FLAGS.num_classes, size=batch).astype(np.int32))
  case = {'part': part, 'arch': arch, 'resolution': resolution, 'input_size': input_size, 'batch': batch,
          'width': FLAGS.width, 'stem': FLAGS.stem, 'pgd_steps': FLAGS.pgd_steps}
  impls = {}
  call, info = ours(part, arch, resolution, input_size, batch, data)
  impls['ours'] = call
  case['ours_compile_s'] = round(info['compile_s'], 3)
  if 'xla_bytes' in info:
    case['ours_xla_bytes'] = info['xla_bytes']
  images = info.get('images', batch)
  if part == 'autoattack':
    case.update(robust_points=info['robust_points'], aa_eps=FLAGS.aa_eps)
  if torch is not None and FLAGS.torch == 'auto':
    t_call, t_info = reference(part, arch, resolution, input_size, batch, data)
    if t_call is None:
      case['torch_skipped'] = t_info['skipped']
    else:
      impls['torch'] = t_call
      case['torch_threads'] = t_info['threads']
  elif torch is None:
    case['torch_skipped'] = 'torch is not installed'
  for name, call in impls.items():  # warm-up, with its memory
    case[f'{name}_peak_bytes'] = _measure_memory(call, name)['peak_bytes']
  times = {name: [] for name in impls}
  for rep in range(FLAGS.reps):
    order = list(impls) if rep % 2 == 0 else list(impls)[::-1]
    for name in order:
      t0 = time.perf_counter()
      impls[name]()
      times[name].append(time.perf_counter() - t0)
  flops = None
  if part == 'train':
    flops = (2 * FLAGS.pgd_steps + 6) * info['flops_per_forward']
  elif part == 'eval':
    flops = (2 * FLAGS.pgd_steps + 3) * info['flops_per_forward']
  case['flops_per_image'] = flops
  for name, ts in times.items():
    med = statistics.median(ts)
    case[f'{name}_times_s'] = [round(t, 4) for t in ts]
    case[f'{name}_img_per_s'] = images / med
    if part == 'autoattack':
      case[f'{name}_s_per_image'] = med / images
    if flops:
      case[f'{name}_flop_per_s'] = flops * images / med
      if FLAGS.peak_flops:
        case[f'{name}_utilisation'] = flops * images / med / FLAGS.peak_flops
  if 'torch_img_per_s' in case:
    case['ratio'] = case['ours_img_per_s'] / case['torch_img_per_s']
  return case


def _fmt(v, spec):
  return format(v, spec) if isinstance(v, (int, float)) else '-'


def print_table(cases: List[Dict]):
  head = (f'{"part":10} {"arch":9} {"res":>8} {"batch":>5} {"ours img/s":>10} {"torch img/s":>11} '
          f'{"ratio":>6} {"compile s":>9} {"GFLOP/img":>9} {"ours GFLOP/s":>12} {"torch GFLOP/s":>13} '
          f'{"ours MiB":>8} {"torch MiB":>9} {"ours MFU":>8} {"torch MFU":>9}')
  print(head)
  print('-' * len(head))
  for c in cases:
    res = f'{c["resolution"]}' + (f'>{c["input_size"]}' if c['input_size'] != c['resolution'] else '')
    mib = lambda b: b / 2**20 if b is not None else None  # noqa: E731
    gf = lambda f: f / 1e9 if f is not None else None  # noqa: E731
    print(f'{c["part"]:10} {c["arch"]:9} {res:>8} {c["batch"]:>5} {_fmt(c.get("ours_img_per_s"), "10.3f")} '
          f'{_fmt(c.get("torch_img_per_s"), "11.3f")} {_fmt(c.get("ratio"), "6.2f")} '
          f'{_fmt(c.get("ours_compile_s"), "9.1f")} {_fmt(gf(c.get("flops_per_image")), "9.2f")} '
          f'{_fmt(gf(c.get("ours_flop_per_s")), "12.1f")} {_fmt(gf(c.get("torch_flop_per_s")), "13.1f")} '
          f'{_fmt(mib(c.get("ours_peak_bytes")), "8.0f")} {_fmt(mib(c.get("torch_peak_bytes")), "9.0f")} '
          f'{_fmt(c.get("ours_utilisation"), "8.1%")} {_fmt(c.get("torch_utilisation"), "9.1%")}')


def main(argv):
  del argv
  for part in FLAGS.parts:
    if part not in ('train', 'eval', 'autoattack'):
      raise app.UsageError(f'--parts: unknown part {part!r}; use train, eval, autoattack.')
  for arch in FLAGS.arch:
    if arch not in models.ARCHITECTURES:
      raise app.UsageError(f'--arch: unknown architecture {arch!r}; use {sorted(models.ARCHITECTURES)}.')
  if torch is None:
    print('torch is not installed: timing ours only (pip install torch to compare with the reference).')
  elif FLAGS.torch == 'off':
    print('--torch=off: timing ours only.')
  if FLAGS.threads:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:FLAGS.threads]))  # before jax starts
    if torch is not None:
      torch.set_num_threads(FLAGS.threads)
  malloc_tuned = host.retain_freed_memory() if FLAGS.retain_freed_memory else False
  xla_flags_set = host.set_xla_cpu_flags() if FLAGS.xla_cpu_flags else False
  load_before = _loadavg()
  print(f'jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'torch {torch.__version__ if torch else "absent"}, {os.cpu_count()} CPUs, load {load_before}',
        flush=True)
  cases = []
  for arch in FLAGS.arch:
    for resolution in map(int, FLAGS.resolution):
      for batch in map(int, FLAGS.batch):
        for part in FLAGS.parts:
          case = run_case(part, arch, resolution, batch)
          cases.append(case)
          if 'ours_img_per_s' in case:
            print(f'[{part} {arch} {resolution}px b{batch}] ours {case["ours_img_per_s"]:.3f} img/s'
                  + (f', torch {case["torch_img_per_s"]:.3f} img/s, ratio {case["ratio"]:.2f}'
                     if 'ratio' in case else ''), flush=True)
  load_after = _loadavg()
  print()
  print_table(cases)
  print(f'load average (1, 5, 15 min) before {load_before}, after {load_after}')
  if FLAGS.json:
    import resource  # pylint: disable=import-outside-toplevel
    out = {
        'machine': {'platform': platform.platform(), 'processor': platform.processor(),
                    'cpus': os.cpu_count(), 'backend': jax.default_backend(),
                    'device': jax.devices()[0].device_kind, 'jax': jax.__version__,
                    'torch': torch.__version__ if torch else None,
                    'xla_flags': os.environ.get('XLA_FLAGS', ''),
                    'load_before': load_before, 'load_after': load_after,
                    'process_maxrss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        'settings': {'conv_impl': FLAGS.conv_impl, 'attention_impl': FLAGS.attention_impl, 'dtype': FLAGS.dtype,
                     'reps': FLAGS.reps,
                     'lora_rank': FLAGS.lora_rank, 'num_classes': FLAGS.num_classes,
                     'torch_channels_last': FLAGS.torch_channels_last, 'threads': FLAGS.threads,
                     'torch_autocast': FLAGS.torch_autocast,
                     'torch_matmul_precision': FLAGS.torch_matmul_precision, 'remat': FLAGS.remat,
                     'peak_flops': FLAGS.peak_flops,
                     'retain_freed_memory': malloc_tuned, 'xla_cpu_flags': xla_flags_set},
        'cases': cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump(out, f, indent=1)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
