"""Converted checkpoints on disk: an Orbax checkpoint with items 'variables' and 'meta' (what the command
line writes and config.pretrained=DIR reads)."""

from __future__ import annotations

import os
import shutil
from typing import Tuple

from autolora_jax import hub
from autolora_jax.convert.api import convert_file
from autolora_jax.convert.families import ARCHS
from autolora_jax.errors import CheckpointError, DamagedCheckpointError


def save(directory: str, variables: dict, meta: dict, overwrite: bool = False) -> str:
  """Writes converted variables and their meta as an Orbax checkpoint (checkpoints.save_variables)."""
  from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top (Orbax only when needed)
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(directory):
    if not overwrite:
      raise CheckpointError(f'{directory} exists already: choose another --dst or pass --overwrite.')
    if not is_converted(directory):
      raise CheckpointError(f'{directory} exists and is not a converted checkpoint: refusing to replace it.')
    shutil.rmtree(directory)
  return checkpoints.save_variables(directory, variables, meta)


def is_converted(directory: str) -> bool:
  """Whether `directory` looks like a checkpoint written by `save`."""
  from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.has_variables(directory)


def load(directory: str) -> Tuple[dict, dict]:
  """(variables, meta) of a checkpoint written by `save` (numpy arrays)."""
  from autolora_jax import checkpoints  # pylint: disable=g-import-not-at-top (Orbax only when needed)
  directory = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(directory):
    raise CheckpointError(f'The converted checkpoint {directory} does not exist. Make it with `python -m '
                          'autolora_jax.convert --src=FILE.ckpt --dst=DIR --arch=...` (see docs/checkpoints_and_data.md).')
  if not is_converted(directory):
    raise CheckpointError(f'{directory} is not a converted checkpoint (no "variables" and "meta" items): make '
                          'it with `python -m autolora_jax.convert --src=FILE.ckpt --dst=DIR --arch=...`.')
  try:
    return checkpoints.restore_variables(directory)
  except DamagedCheckpointError as e:
    raise DamagedCheckpointError(
        f'The converted checkpoint {directory} cannot be read ({e.cause}): convert the PyTorch file again '
        f'(`python -m autolora_jax.convert --src=FILE.ckpt --dst={directory} --arch=... --overwrite`).',
        folder=e.folder, step=e.step, cause=e.cause) from None


def load_any(path: str, arch: str, allow_pickle: bool = False) -> Tuple[dict, dict]:
  """(variables, meta) from a converted Orbax folder or, converted on the fly, a PyTorch or safetensors file,
  local or on the hub (hf://ORG/REPO/PATH[@REVISION]).

  For a folder, `arch` must match the architecture it was converted for.
  """
  if hub.is_hub_path(path):
    return convert_file(path, arch, allow_pickle=allow_pickle)
  if os.path.isdir(os.path.expanduser(path)):
    variables, meta = load(path)
    if meta.get('arch') != arch:
      model_arch, stem = ARCHS.get(meta.get('arch'), (meta.get('arch'), '?'))
      raise CheckpointError(
          f'{path} holds a converted {meta.get("arch")} (width {meta.get("width")}), but the run builds a '
          f'{arch}: set --config.model.arch={model_arch} --config.model.stem={stem}, or point '
          'config.pretrained at a checkpoint of the configured architecture.')
    return variables, meta
  return convert_file(os.path.expanduser(path), arch, allow_pickle=allow_pickle)
