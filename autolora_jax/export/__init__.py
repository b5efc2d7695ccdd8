"""A finished run's deployed model for PyTorch and the field's tools.

    autolora-export --workdir=/tmp/demo --out=/tmp/demo_export            # the best checkpoint
    autolora-export --workdir=/tmp/demo --out=/tmp/demo_export --check=200  # and the original AutoAttack

`export(workdir, out)` writes into `out`:

* model.safetensors: the deployed model (the adversarial branch: the feature extractor with its BatchNorm
  statistics and the head; no LoRa factors, no TWINS frozen twins) under PyTorch's key names
  (`convert.export_state_dict`): torchvision's ResNet names (ImageNet stem), the CIFAR layout's (CIFAR
  stem), timm's ViT names. `autolora-convert --src=model.safetensors --arch=<convert_arch>` reads it back.
* model.json: what the model is and how it was made (`model_card_data`).
* model.pt: a TorchScript program (`torch.jit.load`, nothing of this package needed): NCHW float images in
  [0, 1] of `input_shape` -> logits, with the model's resize, clamp and normalisation inside;
  differentiable with respect to its input.
* README.md: a model card with the numbers and the lines that load and check the model.

The folder appears complete or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np

import autolora_jax
from autolora_jax import convert
from autolora_jax.errors import CheckpointError, InputError

log = logging.getLogger(__name__)

FILES = ('model.safetensors', 'model.json', 'model.pt', 'README.md')
FORMAT_VERSION = 1
TORCH_INSTALL = 'pip install torch --index-url https://download.pytorch.org/whl/cpu'


class ExportError(InputError):
  """Bad export input (an existing --out, a missing optional package): nothing was written."""


def import_torch():
  """torch, or an ExportError saying how to install it."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ExportError('Exporting writes a PyTorch program (model.pt) and needs PyTorch, which is not '
                      f'installed (an optional dependency): install it with `{TORCH_INSTALL}` (or `pip install '
                      '"autolora-jax[export]"`) and run the export again. Nothing was written.') from None
  return torch


def check_out(out: str, overwrite: bool) -> str:
  """The absolute output folder; ExportError if it exists, is not empty and `overwrite` is False."""
  path = os.path.abspath(os.path.expanduser(out))
  if os.path.isfile(path):
    raise ExportError(f'--out={path} is a file; the export writes a folder. Choose another --out.')
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise ExportError(f'--out={path} exists and is not empty ({", ".join(sorted(os.listdir(path))[:5])}): '
                      'choose a new folder, or pass --overwrite to replace it.')
  return path


def model_spec(model, variables: dict, arch: str) -> dict:
  """The architecture part of model.json for a Flax model (a `models.ResNet` or `models.ViT`) with its
  variables and `config.model.arch`: what `torch_models.build` and `autolora-convert --arch` need (the
  architecture's fields from its mapping, `export_fields`)."""
  params = variables['params']
  spec = {'arch': arch, 'stem': model.stem, 'convert_arch': convert.arch_for(arch, model.stem),
          'num_classes': int(np.shape(params['head']['bias'])[0]), 'model_input_size': int(model.input_size),
          'mean': None if model.mean is None else [float(v) for v in model.mean],
          'std': None if model.std is None else [float(v) for v in model.std]}
  spec.update(convert.mapping(arch).export_fields(model, params))
  return spec


def model_card_data(run, spec: dict, input_shape) -> dict:
  """model.json: the spec, the data the model takes, what it was trained for and its test numbers."""
  results = run.results
  entry = results.get(run.checkpoint, {})
  return {
      'format': 'autolora-jax export', 'format_version': FORMAT_VERSION,
      **spec,
      'input_shape': [int(v) for v in input_shape],
      'preprocessing': {'resize': f'nearest to {spec["model_input_size"]} x {spec["model_input_size"]} '
                                  "(PyTorch's legacy 'nearest')", 'clamp': [0.0, 1.0],
                        'mean': spec['mean'], 'std': spec['std']},
      'classes': list(run.classes),
      'threat_model': {'norm': run.norm, 'eps': run.eps},
      'method': str(run.config.method), 'dataset': str(run.config.dataset.name),
      'checkpoint': run.checkpoint, 'epoch': run.epoch,
      'test': entry.get('test', {}), 'num_test': results.get('num_test'),
      'autoattack': results.get('autoattack', {}),
      'package_version': autolora_jax.__version__,
  }


def torch_model(model, variables: dict, arch: str):
  """The deployed model of a Flax model and its variables as a PyTorch module (`torch_models.Deployed`,
  eval mode): the adversarial branch, with the same preprocessing inside."""
  torch = import_torch()
  from autolora_jax.export import torch_models  # pylint: disable=g-import-not-at-top (torch)
  spec = model_spec(model, variables, arch)
  module = torch_models.build(spec)
  state = convert.export_state_dict(variables, spec['convert_arch'])
  module.net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
  return module.eval()


def script(module):
  """`torch.jit.script` of a module (its deprecation warning in newer PyTorch releases silenced: the
  TorchScript format is what `torch.jit.load` reads everywhere)."""
  torch = import_torch()
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)
    warnings.simplefilter('ignore', FutureWarning)
    return torch.jit.script(module)


def export(workdir: str, out: str, checkpoint: str = 'best', overwrite: bool = False) -> dict:
  """Writes the four FILES of a finished run's checkpoint into `out` (see the module docstring).

  Returns:
    model.json's content, with 'out' (the folder) added.
  Raises:
    ExportError / WorkdirError / CheckpointError (one paragraph, nothing written): an existing non-empty
    `out` without `overwrite`, a workdir without a finished run, an unknown checkpoint, no PyTorch, a
    method that deploys W + dW (`Method.deployed_branch`, e.g. lora_at).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from autolora_jax import api  # pylint: disable=g-import-not-at-top
  path = check_out(out, overwrite)
  import_torch()
  run = api.load(workdir, checkpoint)
  if run.branch != 'adv':
    raise ExportError(f'The run in {run.workdir} (config.method={run.config.method}) deploys W + dW, its '
                      "model's LoRa-carrying branch, and the export writes the feature extractor without the "
                      'LoRa update: it cannot export this run. Load it with autolora_jax.load (Run.logits) '
                      'instead. Nothing was written.')
  spec = model_spec(run.model, run.variables, str(run.config.model.arch))
  input_shape = run.input_shape
  if input_shape is None:  # a run whose results.json does not record it: one test image tells
    x, _ = run.test_points(1)
    input_shape = [x.shape[3], x.shape[1], x.shape[2]]
  card = model_card_data(run, spec, input_shape)
  module = torch_model(run.model, run.variables, spec['arch'])
  state = convert.export_state_dict(run.variables, spec['convert_arch'])
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              os.path.join(staging, 'model.safetensors'),
              metadata={'format': 'pt', 'arch': spec['convert_arch']})
    with open(os.path.join(staging, 'model.json'), 'w') as f:
      json.dump(card, f, indent=2)
      f.write('\n')
    script(module).save(os.path.join(staging, 'model.pt'))
    from autolora_jax.export import card as cards  # pylint: disable=g-import-not-at-top
    with open(os.path.join(staging, 'README.md'), 'w') as f:
      f.write(cards.model_card(card, workdir=run.workdir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
    for name in os.listdir(staging):
      os.chmod(os.path.join(staging, name), 0o666 & ~umask)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.replace(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return {**card, 'out': path}


def check_card(out: str) -> dict:
  """model.json of an export folder; CheckpointError if `out` is not one."""
  path = os.path.join(out, 'model.json')
  if not os.path.isfile(path):
    raise CheckpointError(f'{out} holds no model.json: it is not a folder written by autolora-export.')
  with open(path) as f:
    return json.load(f)
