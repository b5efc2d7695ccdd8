"""Wall time of AutoAttack on a trained workdir's model: prints one line per version.

    python benchmarks/autoattack_speed.py --config=configs/demo.py --workdir=/tmp/demo --num_points=1000

The points are all images of the config's data set (every split, in their stored order: for the digits
demo, the 5-9 digits of scikit-learn's data set) repeated cyclically up to --num_points; each repeat draws
its own random starts (the keys depend on the point's position). The model is the 'best' checkpoint's
adversarial branch. Each version runs twice: the first run includes compilation, the second does not.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from autolora_jax import autoattack, checkpoints, input_pipeline, models, pretrain

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'The config the workdir was trained with.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished training workdir.')
_NUM_POINTS = flags.DEFINE_integer('num_points', 1000, 'Points to attack.')
_VERSIONS = flags.DEFINE_list('versions', ['fast', 'standard'], 'AutoAttack versions to time.')
_BATCH = flags.DEFINE_integer('batch_size', 250, 'AutoAttack batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Runs per version (the first includes compilation).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Progress bars.')


def main(_):
  config = _CONFIG.value
  data = input_pipeline.create_dataset(config.dataset, seed=config.seed)
  model = models.create_model(config.model, data.num_classes)
  template = pretrain.init_variables(model, config.model.input_size, config.seed)
  ckpts = checkpoints.Checkpoints(_WORKDIR.value)
  variables, meta = ckpts.restore('best', template)
  ckpts.close()
  x = np.concatenate([data.splits[s][0] for s in ('train', 'validation', 'test')]).astype(np.float32)
  y = np.concatenate([data.splits[s][1] for s in ('train', 'validation', 'test')]).astype(np.int32)
  reps = -(-_NUM_POINTS.value // len(y))
  x, y = np.tile(x, (reps, 1, 1, 1))[:_NUM_POINTS.value], np.tile(y, reps)[:_NUM_POINTS.value]
  fn = jax.tree_util.Partial(lambda v, z: model.apply(v, z, branch='adv', train=False), variables)
  print(f'{len(y)} points ({len(data.splits["train"][1]) + len(data.splits["validation"][1]) + len(data.splits["test"][1])} '
        f'distinct), input {x.shape[1:]}, best checkpoint of epoch {meta["epoch"]}, eps {config.attack.eps:.4f}, '
        f'batch {_BATCH.value}, {jax.device_count()} {jax.devices()[0].platform} device(s)', flush=True)
  for version in _VERSIONS.value:
    for r in range(_REPEATS.value):
      start = time.time()
      res = autoattack.run(fn, x, y, eps=config.attack.eps, version=version, batch_size=_BATCH.value,
                           progress=_PROGRESS.value)
      total = time.time() - start
      per = ', '.join(f'{k} {v:.1f}s' for k, v in res.seconds.items())
      acc = ', '.join(f'{k} {100 * v:.1f}%' for k, v in res.accuracy.items())
      print(f'{version} run {r + 1}{" (with compilation)" if r == 0 else ""}: {total:.1f} s wall | {per} | '
            f'accuracy after: {acc}', flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
