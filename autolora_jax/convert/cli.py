"""The command line: `python -m autolora_jax.convert --src=FILE --dst=DIR --arch=...` (`autolora-convert`)."""

from __future__ import annotations

import os
from typing import Tuple

import jax
import numpy as np

from autolora_jax.convert.api import NORMALIZATIONS, convert_file
from autolora_jax.convert.families import ARCHS
from autolora_jax.convert.storage import save
from autolora_jax.errors import CheckpointError

USAGE = ('Pass --src=FILE (a PyTorch or safetensors checkpoint), --dst=DIR and --arch=ARCH; see '
         'docs/checkpoints_and_data.md, "Converting them".')


def _parse_floats(text: str, name: str) -> Tuple[float, ...]:
  try:
    values = tuple(float(v) for v in text.split(','))
  except ValueError:
    raise CheckpointError(f'--{name}={text!r}: give three comma-separated numbers, e.g. 0.5,0.5,0.5.') from None
  return values


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  if f.mean or f.std:
    if not (f.mean and f.std):
      raise CheckpointError('Pass --mean and --std together.')
    normalization = (_parse_floats(f.mean, 'mean'), _parse_floats(f.std, 'std'))
  else:
    normalization = f.normalization
  if os.path.exists(os.path.expanduser(f.dst)) and not f.overwrite:  # before the (slow) conversion
    raise CheckpointError(f'{os.path.abspath(os.path.expanduser(f.dst))} exists already: choose another --dst '
                          'or pass --overwrite.')
  variables, meta = convert_file(f.src, f.arch, normalization=normalization, allow_pickle=f.allow_pickle)
  directory = save(f.dst, variables, meta, overwrite=f.overwrite)
  n = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables))
  print(f'Converted {f.src} ({meta["layout"]} layout) -> {directory}\n'
        f'  {meta["arch"]}, width {meta["width"]}, {meta["num_classes"]}-way head, {n:,} numbers\n'
        f'  input normalisation ({meta["normalization"]}): mean {meta["mean"]}, std {meta["std"]}\n'
        f'  not used: {", ".join(meta["unused_keys"]) or "nothing"}\n'
        f'Fine-tune with --config.pretrained={directory}')


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('src', None, 'Checkpoint file: PyTorch (.ckpt/.pt/.pth) or .safetensors, local or on the '
                      'Hugging Face hub as hf://ORG/REPO/PATH[@REVISION].')
  flags.DEFINE_string('dst', None, 'Folder to write the Orbax checkpoint to.')
  flags.DEFINE_enum('arch', None, list(ARCHS), 'Architecture of the checkpoint.')
  flags.DEFINE_enum('normalization', 'auto', list(NORMALIZATIONS),
                    "Input normalisation the model applies: 'auto' = the checkpoint's normaliser if any, else "
                    'ImageNet statistics (ImageNet stem) or none (CIFAR layout).')
  flags.DEFINE_string('mean', '', 'Explicit per-channel mean, e.g. 0.4914,0.4822,0.4465 (with --std).')
  flags.DEFINE_string('std', '', 'Explicit per-channel std (with --mean).')
  flags.DEFINE_bool('allow_pickle', False, 'Also read files holding Python objects (runs code from the file: '
                    'only for files you trust).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing converted checkpoint at --dst.')
  flags.mark_flags_as_required(['src', 'dst', 'arch'])


def run_cli() -> None:
  """The console script `autolora-convert` (and python -m autolora_jax.convert)."""
  from autolora_jax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run_command(lambda command: main(None), USAGE, 'autolora_jax.convert')
