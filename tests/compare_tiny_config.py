"""Config for the comparison tests (tests/test_compare.py): tiny_runs.tiny_config with one epoch for every
method (AutoLoRa and the baselines), three classes and AutoAttack (fast) on 16 test points."""

import tiny_runs


def get_config():
  config = tiny_runs.tiny_config(epochs=1)
  config.dataset.classes = (5, 6, 7)
  config.fixed.epochs = 1
  config.fixed.boundaries = ()
  config.autoattack.version = 'fast'
  config.autoattack.num_points = 16
  config.autoattack.batch_size = 16
  return config
