"""configs/fashion_mnist.py run long enough for AutoLoRa's automatic learning rate to act: 30 epochs instead of 8.

The schedule (docs/method.md, "Automatic learning rate") decides at the window boundaries after epochs 5, 9, 13,
..., 29 (windows of 4 epochs): 7 decisions, each of which halves the learning rate and reloads the best
checkpoint when the validation PGD-10 accuracy rose in fewer than 3 of the window's 4 epochs or the best has not
improved since the previous boundary. At 8 epochs there is one boundary; over 30 the accuracy levels off and
several halvings (with their reloads) are expected. Each run's curves.png marks every halving, reload and the
stop on the validation curve (read from its metrics.jsonl).

Vanilla RFT runs at the best point of the Fashion-MNIST sensitivity grid (docs/evidence/sensitivity.md: lr 0.03,
KL weight l2 = 1; 8 epochs) over the same 30 epochs, lr / 10 after epochs 15 and 23 (50% and 75%, as the
default's 30 and 45 of 60). If a new grid finds another best point, pass it: --config.fixed.lr=...
--config.fixed.l2=...

    python -m autolora_jax.compare --config=configs/fashion_mnist_long.py --methods=autolora,vanilla_rft \
        --seeds=0,1,2 --workdir=/tmp/fashion_long --config.progress=False

Expected: about 15 minutes per run on 2 CPU cores (30 epochs of about 25 s, then the test with AutoAttack on
200 points), so about 1.5 hours for the 6 runs. The same with the initial learning rate picked by the probe
(config.auto_lr.lr0='auto', 4 candidates of one epoch each: about 1.5 extra minutes per run) beside the default:

    python -m autolora_jax.compare --config=configs/fashion_mnist_long.py --methods=autolora --seeds=0,1,2 \
        --workdir=/tmp/fashion_long_auto --config.auto_lr.lr0=auto --config.progress=False
"""

from autolora_jax.configs import fashion_mnist

EPOCHS = 30
BOUNDARIES = (15, 23)


def get_config():
  config = fashion_mnist.get_config()
  config.auto_lr.max_epochs = EPOCHS
  config.fixed.lr = 0.03  # the sensitivity grid's best point (docs/evidence/sensitivity.md)
  config.fixed.l2 = 1.0
  config.fixed.epochs = EPOCHS
  config.fixed.boundaries = BOUNDARIES
  config.twins.epochs = EPOCHS
  config.twins.boundaries = BOUNDARIES
  config.lora_at.epochs = EPOCHS
  config.lora_at.boundaries = BOUNDARIES
  return config
