"""Deprecated: the ViT checkpoint mapping is autolora_jax.convert.vit."""

import warnings

from autolora_jax.convert.vit import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import

warnings.warn('autolora_jax.convert_vit is deprecated: use autolora_jax.convert.vit.', DeprecationWarning,
              stacklevel=2)
