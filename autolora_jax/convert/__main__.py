"""`python -m autolora_jax.convert`: the command line (convert/cli.py)."""

from autolora_jax.convert.cli import run_cli

run_cli()
