"""PyTorch checkpoints -> this project's models: the robust ImageNet ResNets the paper uses, and ViTs.

Reads a PyTorch file (.ckpt/.pt/.pth: torch is needed only for this, to unpickle it) or a .safetensors file
(no torch; bfloat16 and float16 weights become float32), also as a file of a Hugging Face hub repository,
hf://ORG/REPO/PATH[@REVISION] (autolora_jax.hub: downloaded into huggingface_hub's cache), holding:

* robustness-library checkpoints (e.g. resnet18_linf_eps4.0.ckpt, resnet50_linf_eps4.0.ckpt): a dict with the
  state dict under 'model' or 'state_dict', keys 'module.model.<torchvision key>', a duplicate set under
  'module.attacker.model.' (ignored) and the input normaliser 'module.normalizer.new_mean/new_std';
* plain torchvision state dicts, also with a 'model.' or 'module.' prefix;
* the common CIFAR layout (3x3 stride-1 stem, no max-pool, blocks with 'shortcut.0/1', head 'linear');
* timm ViT-S/16 and ViT-B/16 state dicts and their ConvStem variant, also under
  RobustBench's or ARES's wrappers: a normalisation module in front ('normalize.mean/std'), 'model.' or
  'module.' prefixes.

Convolution kernels go from OIHW to HWIO, the linear head is transposed, BatchNorm weight/bias become params
scale/bias and running_mean/running_var become batch_stats mean/var. The ImageNet head is kept, so that a
converted model reproduces the checkpoint's logits; fine-tuning replaces it (`pretrain.transplant`).

The input normalisation a checkpoint expects (its normaliser, the ImageNet statistics, none, or a given
mean/std) travels with the converted weights and is applied inside the model (`models.ResNet.mean/std`).

    python -m autolora_jax.convert --src=resnet18_linf_eps4.0.ckpt --dst=pretrained/resnet18_linf_eps4.0 \
        --arch=resnet18

writes an Orbax checkpoint (items 'variables' and 'meta') that `config.pretrained=DIR` loads.

The package: reading.py (files to state dicts), families.py (--arch names and each architecture's mapping,
found through `models.spec(arch).converter`), common.py (layouts and templates), resnet.py and vit.py (the
mappings), api.py (conversion, model, LoRa factors, export state dict), storage.py (Orbax), cli.py.
"""

from autolora_jax.convert.api import (
                                      FORMAT_VERSION,
                                      NORMALIZATIONS,
                                      Normalization,
                                      add_lora,
                                      build_model,
                                      convert_file,
                                      convert_state_dict,
                                      deployed_paths,
                                      export_state_dict,
                                      from_torch,
                                      model_config,
                                      resolve_normalization,
)
from autolora_jax.convert.cli import main, run_cli
from autolora_jax.convert.common import (
                                      arch_for,
                                      converted_archs,
                                      map_weights,
                                      template,
                                      to_flax,
                                      torch_layout,
                                      torch_shape,
)
from autolora_jax.convert.families import ARCHS, check_arch, identify, mapping, mappings
from autolora_jax.convert.reading import (
                                      SAFETENSORS_INSTALL,
                                      TORCH_INSTALL,
                                      is_safetensors,
                                      read_state_dict,
                                      split_state_dict,
)
from autolora_jax.convert.resnet import describe as guess_arch
from autolora_jax.convert.resnet import flax_path
from autolora_jax.convert.storage import is_converted, load, load_any, save
from autolora_jax.errors import CheckpointError

__all__ = [
    'ARCHS', 'FORMAT_VERSION', 'NORMALIZATIONS', 'SAFETENSORS_INSTALL', 'TORCH_INSTALL', 'CheckpointError',
    'Normalization', 'add_lora', 'arch_for', 'build_model', 'check_arch', 'convert_file', 'convert_state_dict',
    'converted_archs', 'deployed_paths', 'export_state_dict', 'flax_path', 'from_torch', 'guess_arch',
    'identify', 'is_converted', 'is_safetensors', 'load', 'load_any', 'main', 'map_weights', 'mapping',
    'mappings', 'model_config', 'read_state_dict', 'resolve_normalization', 'run_cli', 'save',
    'split_state_dict', 'template', 'to_flax', 'torch_layout', 'torch_shape',
]
