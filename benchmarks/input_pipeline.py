r"""Host-side costs of the input pipeline and the training loop, measured without an accelerator.

    python -m benchmarks.input_pipeline --json=OUT.json

Two parts, both on the 224 x 224 pipelines of the high-resolution data sets (data/transforms.py):

* decode: JPEGs it generates at the data sets' usual size (`--jpeg_size`, 500 x 375, smooth content plus
  noise, quality 90) decoded and augmented one at a time on one core (`imagenet_train`: resize 256,
  random-resized crop 224, flip; `imagenet_eval`: resize 256, centre crop 224), images per second per
  core; the training transform in a pool of N threads and of N processes (`concurrent.futures`, for each
  N in `--workers`; which one the data sets should use); and the training batches of an `ImageDataset`
  over those JPEGs with N decoding threads. Images per second in all and per core used (min(N, the cores
  this process may run on)).
* loop: the host time per step of `loop.train_epoch` driven by a trivial pmapped step (a mean of one
  pixel per example: no time on the device) on 4 fake CPU devices (the environment variable BENCH_DEVICES,
  read before JAX starts, sets another count) at `--batch` x 224 x 224
  x 3, fed by an `ImageDataset` whose decoding is a look-up of ready images (so what is measured is the
  batch assembly, the transfer to the devices, the metric reads and the loop itself), milliseconds per
  step (the median of `--reps` epochs of `--steps` steps after a warm-up epoch).

* epoch: an epoch's fixed costs on the host for a ResNet-18 (rank-8 LoRa, 200 classes) state: the latest
  checkpoint's save (`checkpoints.Checkpoints`: the host copy, the time until `save` returns, which the
  step loop waits for, and until the files are on disk) and one redraw of curves.png over 60 epochs.

Budget of an 8-GPU host (a ResNet-18 step at batch 128 takes tens of milliseconds): the decoding must
deliver 2,000-3,000 images per second per host, and the loop must cost a few milliseconds per step.
The numbers depend on how busy the machine's cores are: run it alone for comparable figures.
"""

from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count='
                           + os.environ.get('BENCH_DEVICES', '4'))

import concurrent.futures  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

from autolora_jax import loop, steps  # noqa: E402
from autolora_jax.data import transforms  # noqa: E402
from autolora_jax.data.dataset import ImageDataset, Split  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 64, 'JPEGs generated for the decode part')
flags.DEFINE_string('jpeg_size', '500x375', 'width x height of the generated JPEGs')
flags.DEFINE_string('workers', '1,2', 'decoding workers: comma-separated counts')
flags.DEFINE_integer('batch', 128, 'global batch of the loop part')
flags.DEFINE_integer('steps', 12, 'steps per timed epoch of the loop part')
flags.DEFINE_integer('reps', 3, 'timed epochs of the loop part (median)')
flags.DEFINE_string('parts', 'decode,loop,epoch', 'which parts to run')
flags.DEFINE_string('json', '', 'write the numbers here as JSON')


def cores() -> int:
  """The cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def make_jpegs(n: int, width: int, height: int, seed: int = 0) -> list:
  """n JPEG byte strings of width x height: smooth random colour fields plus noise, quality 90."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                     Image.BICUBIC)
    pixels = np.asarray(coarse, np.int16) + rng.integers(-20, 21, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def per_image(fn, records, repeat: int = 2) -> float:
  """Images per second of fn(record, i) on this thread (the best of `repeat` passes)."""
  best = float('inf')
  for _ in range(repeat):
    start = time.perf_counter()
    for i, r in enumerate(records):
      fn(r, i)
    best = min(best, time.perf_counter() - start)
  return len(records) / best


def _train_one(args):
  record, i = args
  return transforms.imagenet_train(record, np.random.default_rng([0, 1, i]))


def pool_rate(kind: str, workers: int, records) -> float:
  """Images per second of the training transform over `records` (twice) in a pool of `workers`."""
  pool_cls = {'threads': concurrent.futures.ThreadPoolExecutor,
              'processes': functools.partial(concurrent.futures.ProcessPoolExecutor,
                                             mp_context=multiprocessing.get_context('spawn'))}[kind]
  jobs = [(r, i) for i, r in enumerate(records)]
  with pool_cls(workers) as pool:
    list(pool.map(_train_one, jobs[:2 * workers]))  # warm-up: the workers start
    start = time.perf_counter()
    for _ in range(2):
      for _ in pool.map(_train_one, jobs, chunksize=4):
        pass
    return 2 * len(jobs) / (time.perf_counter() - start)


def make_dataset(records, labels, train_transform, eval_transform, **kwargs) -> ImageDataset:
  split = Split(np.asarray(records, dtype=object), labels.astype(np.int32),
                np.array([f'train/{i}' for i in range(len(labels))]))
  empty = split.take(np.arange(0))
  return ImageDataset({'train': split, 'validation': empty, 'test': empty}, num_classes=10,
                      train_transform=train_transform, eval_transform=eval_transform,
                      eval_shape=(224, 224, 3), seed=0, **kwargs)


def decode_part(out: dict) -> None:
  width, height = (int(v) for v in FLAGS.jpeg_size.split('x'))
  jpegs = make_jpegs(FLAGS.images, width, height)
  rows = {'train (one core)': per_image(
              lambda r, i: transforms.imagenet_train(r, np.random.default_rng([0, 1, i])), jpegs),
          'eval (one core)': per_image(lambda r, i: transforms.imagenet_eval(r), jpegs)}
  print(f'decode + augment, {width} x {height} JPEGs -> 224 x 224 (cores available: {cores()})')
  for name, v in rows.items():
    print(f'  {name:28s} {v:8.1f} images/s per core')
  out['decode_per_core'] = rows
  labels = np.arange(len(jpegs)) % 10
  batch = 32
  out['pools'], out['dataset'] = {}, {}
  for workers in (int(w) for w in FLAGS.workers.split(',')):
    used = min(workers, cores())
    for kind in ('threads', 'processes'):
      rate = pool_rate(kind, workers, jpegs)
      print(f'  train transform, {workers} {kind:9s}    {rate:8.1f} images/s, {rate / used:7.1f} per core used')
      out['pools'][f'{workers} {kind}'] = {'images_per_s': rate, 'per_core': rate / used}
    data = make_dataset(jpegs, labels, transforms.imagenet_train, transforms.imagenet_eval, threads=workers)
    try:
      for _ in data.train_batches(0, batch):  # warm-up: the pool starts
        pass
      start = time.perf_counter()
      n = 0
      for epoch in (1, 2):
        for b in data.train_batches(epoch, batch):
          n += len(b['label'])
      rate = n / (time.perf_counter() - start)
    finally:
      data.close()
    print(f'  ImageDataset, {workers} threads      {rate:8.1f} images/s, {rate / used:7.1f} per core used')
    out['dataset'][f'{workers} threads'] = {'images_per_s': rate, 'per_core': rate / used}


def trivial_step(state, batch, rng):
  """No work on the device: one pixel per example (the image must still arrive)."""
  del rng
  x = batch['image'][:, 0, 0, 0].astype(jnp.float32)
  return state + 1, jax.lax.pmean({'loss': jnp.mean(x)}, steps.AXIS)


def loop_part(out: dict) -> None:
  n_dev, batch, n_steps = jax.local_device_count(), FLAGS.batch, FLAGS.steps
  rng = np.random.default_rng(0)
  ready = rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
  lookup = lambda record, rng_: ready[int(record) % len(ready)]  # noqa: E731
  n = batch * n_steps
  data = make_dataset(np.arange(n), np.arange(n) % 10, lookup, lookup)
  p_step = loop.pmap_train_step(trivial_step)
  state = loop.replicate(jnp.zeros((), jnp.int32))
  times = []
  try:
    for epoch in range(FLAGS.reps + 1):
      start = time.perf_counter()
      state, _, _ = loop.train_epoch(p_step, state, data.train_batches(epoch, batch), seed=0, epoch=epoch,
                                     steps=n_steps, global_batch=batch, progress=False)
      jax.block_until_ready(state)
      if epoch:
        times.append((time.perf_counter() - start) / n_steps * 1e3)
  finally:
    data.close()
  ms = statistics.median(times)
  print(f'training loop, trivial step, {n_dev} CPU devices, batch {batch} x 224 x 224 x 3: '
        f'{ms:.1f} ms of host time per step (epochs: {", ".join(f"{t:.1f}" for t in times)})')
  out['loop_ms_per_step'] = ms
  out['loop_ms_per_step_reps'] = times


def epoch_part(out: dict) -> None:
  import tempfile  # pylint: disable=g-import-not-at-top

  from autolora_jax import checkpoints, models, pretrain, reporting  # pylint: disable=g-import-not-at-top
  model = models.resnet18(200, lora_rank=8)
  variables = pretrain.init_variables(model, 224, 0)
  state = loop.replicate(steps.create_train_state(model, variables, steps.make_optimizer(0.01, 0.9, 1e-4)))
  rows = {}
  with tempfile.TemporaryDirectory() as workdir:
    ckpts = checkpoints.Checkpoints(workdir)
    for step in (1, 2, 3):
      start = time.perf_counter()
      host = checkpoints.host_copy(state, True)
      copied = time.perf_counter()
      ckpts.save('latest', step, host, {'epoch': step})
      returned = time.perf_counter()
      ckpts.wait()
      rows = {'host copy (ms)': (copied - start) * 1e3, 'save returns (ms)': (returned - copied) * 1e3,
              'save on disk (ms)': (time.perf_counter() - copied) * 1e3}
    ckpts.close()
    records = [{'epoch': e, 'val_pgd10': 0.3, 'val_clean_adv': 0.5, 'val_clean_nat': 0.6, 'lr': 0.01, 'l1': 0.4,
                'l2': 2.0, 'reload_best': e % 7 == 0} for e in range(61)]
    reporting.plot_curves(records, os.path.join(workdir, 'warm.png'))
    start = time.perf_counter()
    reporting.plot_curves(records, os.path.join(workdir, 'curves.png'))
    rows['curves.png, 60 epochs (ms)'] = (time.perf_counter() - start) * 1e3
  n = sum(int(np.prod(np.shape(a))) for a in jax.tree_util.tree_leaves(host))
  print(f'epoch fixed costs, ResNet-18 state ({n / 1e6:.1f} M numbers):')
  for name, v in rows.items():
    print(f'  {name:28s} {v:8.1f}')
  out['epoch'] = rows


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a save at INFO
  out = {'cores': cores(), 'devices': jax.local_device_count()}
  parts = FLAGS.parts.split(',')
  if 'decode' in parts:
    decode_part(out)
  if 'loop' in parts:
    loop_part(out)
  if 'epoch' in parts:
    epoch_part(out)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  app.run(main)
