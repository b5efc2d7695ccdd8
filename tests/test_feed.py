"""How the host feeds the devices: uint8 batches scaled on the device, the background feeder, the sums the
devices keep, and the training loop around them (loop.py), with a trivial pmapped step; and an epoch's fixed
costs on the host (curves.png every few epochs)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autolora_jax import loop, reporting, steps, train
from autolora_jax.data.core import to_unit
from autolora_jax.data.dataset import ImageDataset, Split
from autolora_jax.errors import NonFiniteLossError


def image_dataset(n=24, size=6, seed=0):
  """An ImageDataset whose 'decoding' flips a stored uint8 image at random (a function of its rng)."""
  pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  split = Split(np.arange(n), np.arange(n, dtype=np.int32) % 3, np.array([f'train/{i}' for i in range(n)]))
  flip = lambda r, rng: pixels[r][:, ::-1] if rng.random() < 0.5 else pixels[r]  # noqa: E731
  data = ImageDataset({'train': split, 'validation': split, 'test': split}, 3, train_transform=flip,
                      eval_transform=lambda r: pixels[r], eval_shape=(size, size, 3), seed=seed, threads=2)
  return data, pixels


def test_uint8_batches_scaled_on_the_device_equal_the_host_scaling_bit_for_bit():
  every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  old_host = every.astype(np.float32) * np.float32(1.0 / 255.0)  # what ImageDataset shipped before
  on_device = np.asarray(jax.jit(steps.unit_images)(every))
  assert on_device.dtype == np.float32 and on_device.min() == 0.0 and on_device.max() == 1.0
  np.testing.assert_array_equal(on_device.view(np.uint32), old_host.view(np.uint32))
  np.testing.assert_array_equal(to_unit(every).view(np.uint32), old_host.view(np.uint32))
  # A real batch, through the loop's transfer and a pmapped step.
  data, _ = image_dataset()
  try:
    batch = next(data.train_batches(1, 8))
    assert batch['image'].dtype == np.uint8
    scaled = jax.pmap(lambda b: steps.unit_images(b['image']))(loop.to_devices(batch))
    old = np.stack(list(batch['image'])).astype(np.float32) * np.float32(1.0 / 255.0)
    np.testing.assert_array_equal(np.asarray(scaled).reshape(old.shape).view(np.uint32), old.view(np.uint32))
  finally:
    data.close()
  floats = np.linspace(0, 1, 7, dtype=np.float32)  # float32 images pass unchanged
  np.testing.assert_array_equal(np.asarray(steps.unit_images(jnp.asarray(floats))), floats)


def test_the_feeder_keeps_the_order_and_raises_where_the_source_failed():
  batches = [{'x': np.full((jax.local_device_count(), 2), i, np.int32)} for i in range(7)]
  got = [int(np.asarray(b['x']).ravel()[0]) for b in loop.DeviceFeeder(iter(batches), depth=2)]
  assert got == list(range(7))

  def failing():
    yield batches[0]
    yield batches[1]
    raise ValueError('bad record 17')

  feeder = loop.DeviceFeeder(failing(), depth=3)
  assert int(np.asarray(next(feeder)['x']).ravel()[0]) == 0
  assert int(np.asarray(next(feeder)['x']).ravel()[0]) == 1
  with pytest.raises(ValueError, match='bad record 17'):
    next(feeder)
  feeder.close()


def test_closing_the_feeder_early_stops_and_closes_its_source():
  closed, produced = threading.Event(), []

  def source():
    try:
      for i in range(1000):
        produced.append(i)
        yield {'x': np.full((jax.local_device_count(),), i, np.int32)}
    finally:
      closed.set()

  with loop.DeviceFeeder(source(), depth=2) as feeder:
    next(feeder)
  assert closed.is_set() and len(produced) <= 5  # the consumed one, the queue (2), one in hand


def _sums_of(values, initial=None, start=0):
  sums = loop.DeviceSums(initial)
  n_dev = jax.local_device_count()
  for step, v in enumerate(values, start=start):
    sums.add({k: jnp.full((n_dev,), x, jnp.float32) for k, x in v.items()}, step)
  return sums.read()


def test_device_sums_resume_exactly_and_name_the_first_non_finite_step():
  rng = np.random.default_rng(0)
  values = [{'loss': float(a), 'acc': float(b)} for a, b in rng.random((10, 2)) * 3]
  whole, bad = _sums_of(values)
  assert bad is None
  expect = np.float32(0)
  for v in values:
    expect = np.float32(expect + np.float32(v['loss']))
  assert whole['loss'] == float(expect)  # float32, in step order
  first, _ = _sums_of(values[:4])
  resumed, _ = _sums_of(values[4:], initial=first, start=4)  # a preempted epoch's carry
  assert resumed == whole
  values[6]['acc'] = float('nan')
  values[8]['loss'] = float('inf')
  _, bad = _sums_of(values)
  assert bad == 6


def trivial_step(state, batch, rng):
  """Metrics from the batch alone: the mean pixel (NaN at the fourth step when the state says so)."""
  del rng
  x = steps.unit_images(batch['image'])
  loss = jnp.mean(x) + jnp.where(state['poison'] & (state['n'] == 3), jnp.nan, 0.0)
  metrics = jax.lax.pmean({'loss': loss, 'pixel': jnp.mean(x[:, 0, 0, 0])}, steps.AXIS)
  return {**state, 'n': state['n'] + 1}, metrics


def _epoch(data, metrics_every, poison=False, start_step=0, carry=None, stop_after=None):
  state = loop.replicate({'n': jnp.int32(0), 'poison': jnp.bool_(poison)})
  stop = (lambda _, s: s == stop_after) if stop_after is not None else None
  return loop.train_epoch(loop.pmap_train_step(trivial_step), state, data.train_batches(1, 4, start_step),
                          seed=0, epoch=1, steps=data.steps_per_epoch(4), global_batch=4, progress=False,
                          metrics_every=metrics_every, start_step=start_step, carry=carry, on_step=stop)


def test_train_epoch_means_do_not_depend_on_how_often_they_are_read_and_resume_exactly():
  data, _ = image_dataset()
  try:
    host = [to_unit(b['image']) for b in data.train_batches(1, 4)]
    state, every_step, report = _epoch(data, metrics_every=1)
    _, rarely, _ = _epoch(data, metrics_every=100)
    assert every_step == rarely and report.steps == 6 and int(np.asarray(state['n'])[0]) == 6
    np.testing.assert_allclose(every_step['loss'], np.mean([x.mean() for x in host]), rtol=1e-6)
    # Stopped after step 2 (a preemption), then resumed from its carry: the same means, bit for bit.
    _, _, part = _epoch(data, metrics_every=2, stop_after=2)
    assert part.stopped_at == 3 and part.steps == 3
    _, resumed, whole = _epoch(data, metrics_every=2, start_step=3, carry=part.carry)
    assert resumed == every_step and whole.steps == 6
  finally:
    data.close()


def test_a_non_finite_step_is_named_although_the_metrics_are_read_rarely():
  data, _ = image_dataset()
  try:
    with pytest.raises(NonFiniteLossError, match='at epoch 1, step 3 '):
      _epoch(data, metrics_every=100, poison=True)
  finally:
    data.close()


def test_evaluation_counts_are_summed_on_the_devices():
  data, pixels = image_dataset(n=21)
  try:
    def eval_step(state, batch):
      del state
      hit = (batch['image'][:, 0, 0, 0] > 127).astype(jnp.float32) * batch['mask']
      return jax.lax.psum({'count': jnp.sum(batch['mask']), 'bright': jnp.sum(hit)}, steps.AXIS)
    out = loop.evaluate(loop.pmap_eval_step(eval_step), loop.replicate(jnp.zeros(())),
                        data.eval_batches('test', 8), total=21, global_batch=8)
    assert out['count'] == 21
    assert out['bright'] == pytest.approx(np.mean(pixels[:, 0, 0, 0] > 127))
  finally:
    data.close()


def test_curves_are_drawn_every_plot_every_epochs_and_at_the_end(tmp_path, monkeypatch):
  drawn = []
  monkeypatch.setattr(reporting, 'plot_curves', lambda records, path: drawn.append(records[-1]['epoch']))
  writers = train.Writers(str(tmp_path), is_chief=True, tensorboard=False, plot_every=3)
  for epoch in range(8):
    writers.epoch({'epoch': epoch, 'lr': 0.01, 'stop': epoch == 7})
  writers.close()
  assert drawn == [0, 3, 6, 7]
  assert len(reporting.MetricsLog(str(tmp_path)).read()) == 8  # the log gets every epoch


def test_decoding_threads_follow_the_cpu_affinity(monkeypatch):
  from autolora_jax.data import dataset  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(dataset.os, 'sched_getaffinity', lambda pid: {3, 4, 5}, raising=False)
  monkeypatch.setattr(dataset.os, 'cpu_count', lambda: 96)  # the host's count is not the process's
  assert dataset.default_threads() == 3
  split = Split(np.arange(2), np.zeros(2, np.int32), np.array(['a', 'b']))
  data = ImageDataset({'train': split, 'validation': split, 'test': split}, 2, train_transform=None,
                      eval_transform=None, eval_shape=(1, 1, 3))
  assert data.threads == 3
  monkeypatch.setattr(dataset.os, 'sched_getaffinity', lambda pid: set(range(64)), raising=False)
  assert dataset.default_threads() == 32
