"""A real offline transfer task on Fashion-MNIST: a robust FE from five classes, fine-tuned on five others.

The FE is pre-trained in-process with PGD-AT on T-shirt/top, trouser, pullover, dress and coat (classes
0-4; 600 training images of each), cached so that every method and seed starts from the same FE; then a
method fine-tunes it on sandal, shirt, sneaker, bag and ankle boot (classes 5-9) from 400 training images of
each (a seeded subset of Fashion-MNIST's 6,000 per class, so that one run takes a few minutes on 2 CPU
cores), validated on 10% of those and tested on all 5,000 test images of these classes. A narrow ResNet-18
(width 8) sees the 28 x 28 images resized to 16 x 16 inside the model; the attacks act on the 28 x 28
input. eps 0.1, Fashion-MNIST's usual L-infinity budget: robust accuracy stays far from clean accuracy.

Data: TFDS's fashion_mnist if prepared, else the four idx files of the Debian/Ubuntu package
dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`), see README.md.

    python -m autolora_jax.compare --config=configs/fashion_mnist.py --methods=autolora,vanilla_rft,pgd_at \
        --seeds=0,1,2 --workdir=/tmp/fashion
"""

from autolora_jax.configs import default

PRETRAIN_CLASSES = (0, 1, 2, 3, 4)  # T-shirt/top, trouser, pullover, dress, coat
CLASSES = (5, 6, 7, 8, 9)  # sandal, shirt, sneaker, bag, ankle boot


def get_config():
  config = default.get_config()
  config.dataset.name = 'fashion_mnist'
  config.dataset.classes = CLASSES
  config.dataset.train_per_class_limit = 400
  config.dataset.val_fraction = 0.1

  config.model.width = 8
  config.model.input_size = 16
  config.model.stem = 'cifar'

  config.attack.eps = 0.1
  config.attack.step_size = 0.025  # eps / 4, as 2/255 is for 8/255

  config.pretrain.epochs = 4
  config.pretrain.learning_rate = 0.05
  config.pretrain.batch_size = 64
  config.pretrain.dataset.name = 'fashion_mnist'
  config.pretrain.dataset.classes = PRETRAIN_CLASSES
  config.pretrain.dataset.train_per_class_limit = 600

  config.auto_lr.max_epochs = 8
  # The baselines: as many epochs as AutoLoRa's at most, lr / 10 after epochs 4 and 6.
  config.fixed.epochs = 8
  config.fixed.boundaries = (4, 6)
  # TWINS (--methods=...,twins): its CIFAR settings (lr 0.003, weight decay 1e-5, lambda 1) for these small
  # images, over the same 8 epochs and boundaries.
  default.twins_cifar(config)
  config.twins.epochs = 8
  config.twins.boundaries = (4, 6)
  # LoRa-AT (--methods=...,lora_at): the baselines' 8 epochs and boundaries.
  config.lora_at.epochs = 8
  config.lora_at.boundaries = (4, 6)
  config.batch_size = 64

  # AutoAttack: the fast version (APGD-CE, APGD-T) on 200 test points (a class-stratified sample).
  config.autoattack.version = 'fast'
  config.autoattack.num_points = 200
  config.autoattack.batch_size = 200
  return config
