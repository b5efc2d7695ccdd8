"""Stanford Dogs (TFDS stanford_dogs, 120 classes).

The paper's setting (docs/method.md): AutoLoRa on the robust ImageNet ResNet-18 (L-inf, eps 4/255) converted into
pretrained/resnet18_linf_eps4.0 (README.md); --config.model.arch=resnet50 for Table 2 (it then loads
pretrained/resnet50_linf_eps4.0).
"""

from autolora_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'stanford_dogs'
  config.pretrained = default.robust_imagenet_fe(config)
  return config
