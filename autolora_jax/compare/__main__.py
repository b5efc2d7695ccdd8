"""Compares the fine-tuning methods over seeds, and vanilla RFT's sensitivity to its hyper-parameters.

    python -m autolora_jax.compare --config=configs/demo.py --methods=autolora,vanilla_rft,pgd_at \
        --seeds=0,1,2 --workdir=DIR [--config.KEY=VALUE ...]
    python -m autolora_jax.compare --config=configs/demo.py --sweep --seeds=0 --workdir=DIR
    autolora-compare --config=demo --seeds=0 --workdir=DIR   # the installed command: configs by name

See autolora_jax/compare/__init__.py and docs/methods.md, "Comparing methods and the sensitivity study".
"""

from autolora_jax.compare.cli import run_cli

if __name__ == '__main__':
  run_cli()
