"""The offline demo: robust fine-tuning on scikit-learn's 8x8 digits, no download needed.

It first makes a robust FE in-process (PGD-AT on the digits 0-4), then runs AutoLoRa on the digits 5-9,
eps 8/255, with a narrow ResNet-18. About three minutes on 2 CPU cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'digits'
  config.dataset.classes = (5, 6, 7, 8, 9)
  config.dataset.test_fraction = 0.25
  config.dataset.val_fraction = 0.1  # the demo's data is small: a larger validation split

  config.model.width = 16
  config.model.input_size = 16
  config.model.stem = 'cifar'

  config.pretrain.epochs = 10
  config.pretrain.learning_rate = 0.05
  config.pretrain.batch_size = 64
  config.pretrain.dataset.name = 'digits'
  config.pretrain.dataset.classes = (0, 1, 2, 3, 4)

  config.auto_lr.max_epochs = 12
  # The baselines (--config.method=vanilla_rft or pgd_at): as many epochs as AutoLoRa's at most.
  config.fixed.epochs = 12
  config.fixed.boundaries = (6, 9)
  config.batch_size = 64

  # AutoAttack at the end, kept short: the fast version (APGD-CE, APGD-T) on the first 64 test points.
  config.autoattack.version = 'fast'
  config.autoattack.num_points = 64
  config.autoattack.batch_size = 64
  return config
