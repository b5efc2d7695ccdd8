"""python -m autolora_jax.export: see autolora_jax/export/cli.py."""

from autolora_jax.export import cli

if __name__ == '__main__':
  cli.run()
