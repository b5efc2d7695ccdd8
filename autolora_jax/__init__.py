"""AutoLoRa robust fine-tuning in JAX/Flax.

`autolora_jax.load(workdir, checkpoint='best')` gives a finished run's model (autolora_jax.api); the
subpackages hold the rest (models, autoattack, convert, export, ...).
"""

from importlib import metadata as _metadata

try:  # the one version number is the package's (pyproject.toml)
  __version__ = _metadata.version('autolora-jax')
except _metadata.PackageNotFoundError:  # a source tree used without installing it
  __version__ = '0+unknown'


def load(workdir: str, checkpoint: str = 'best'):
  """A finished run's deployed model: see `autolora_jax.api.load` (imported here on first use)."""
  from autolora_jax import api  # pylint: disable=g-import-not-at-top (keeps `import autolora_jax` light)
  return api.load(workdir, checkpoint)
