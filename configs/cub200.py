"""CUB-200-2011 (TFDS caltech_birds2011, 200 classes), the paper's setting otherwise."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'caltech_birds2011'
  return config
