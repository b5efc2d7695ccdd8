"""configs/fashion_mnist.py run long enough for AutoLoRa's automatic learning rate to act: 30 epochs instead of 8.

The schedule (docs/method.md, "Automatic learning rate") decides at the window boundaries after epochs 5, 9, 13,
..., 29 (windows of 4 epochs): 7 decisions, each of which halves the learning rate and reloads the best
checkpoint when the validation PGD-10 accuracy rose in fewer than 3 of the window's 4 epochs or the best has not
improved since the previous boundary. At 8 epochs there is one boundary; over 30 the accuracy levels off and
several halvings (with their reloads) are expected. Each run's curves.png marks every halving, reload and the
stop on the validation curve (read from its metrics.jsonl).

Vanilla RFT runs at the best learning rate of the Fashion-MNIST sensitivity grid (docs/evidence/sensitivity.md:
lr 0.03; KL weight l2 = 1, 0.08 PGD-10 points from the grid's best, l2 = 0; 8 epochs) over the same 30 epochs,
lr / 10 after epochs 15 and 23 (50% and 75%, as the default's 30 and 45 of 60). If a new grid finds another best
point, pass it: --config.fixed.lr=... --config.fixed.l2=...

    python -m autolora_jax.compare --config=configs/fashion_mnist_long.py --methods=autolora,vanilla_rft \
        --seeds=0,1,2 --workdir=/tmp/fashion_long --config.progress=False

Measured on 2 AMD EPYC cores (jax 0.10.2): 4.2 to 5.1 minutes per run alone (30 epochs of 4-8 s of training plus
validation, then the test with AutoAttack on 200 points), about 30 minutes for the 6 runs. AutoLoRa 90.49 /
76.48 / 73.67 and vanilla RFT 92.16 / 82.41 / 84.17 (best checkpoint, test SA / PGD-10 / AA, mean of 3 seeds;
the README). The same with the initial learning rate picked by the probe (config.auto_lr.lr0='auto', 4
candidates of one epoch each: 27-37 s per run; it picked 0.1 for every seed, and AutoLoRa reached 91.23 / 81.79
/ 81.50) beside the default:

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
