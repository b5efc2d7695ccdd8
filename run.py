"""Runs AutoLoRa robust fine-tuning from a checkout: flags in, `train_and_evaluate(config, workdir)` out.

    python run.py --config=configs/demo.py --workdir=/tmp/demo
    python run.py --config=configs/demo.py --workdir=/tmp/demo --mode=eval   # test evaluation only
    python run.py --config=configs/cub200.py --config.model.arch=resnet50 --workdir=/tmp/cub

The same as the installed command `autolora-train` (autolora_jax/main.py), e.g.
`autolora-train --config=demo --workdir=/tmp/demo` from any folder.
"""

from autolora_jax.main import run

if __name__ == '__main__':
  run()
