"""The LoRa ResNets (resnet.py) and ViTs (vit.py) as architecture specs (archs.py: `spec(arch)`), built by
`create_model` (factory.py); the ResNets' convolution (lora.py), BatchNorm (batchnorm.py) and parameter
groups (groups.py). A model knows no backend: its convolutions (and the ResNets' max-pool) are arguments
(`conv_fn`, `pool_fn`, XLA's by default); autolora_jax.ops provides the CPU ones.

Every module of this package that defines `SPECS` (a tuple of `ArchSpec`) is imported here and its specs
registered: a new architecture family is one module.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from autolora_jax.models.archs import ArchSpec, ArchView, arch_names, collect, register, spec, specs, unregister
from autolora_jax.models.attention import ATTENTION_IMPLS, attend, attention_for
from autolora_jax.models.batchnorm import TWIN_MODES, BatchNorm, TwinBatchNorm, frozen_twin_source
from autolora_jax.models.factory import ARCHITECTURES, create_model, is_vit
from autolora_jax.models.groups import lora_params_count, param_group, param_groups
from autolora_jax.models.lora import ConvFn, LoRaConv, kaiming_normal_fan_out, lora_delta, native_conv2d
from autolora_jax.models.resnet import (
                                     BRANCHES,
                                     IMAGENET_MEAN,
                                     IMAGENET_STD,
                                     LORA_PLACEMENTS,
                                     PRECISIONS,
                                     RESNETS,
                                     STEMS,
                                     BasicBlock,
                                     Bottleneck,
                                     PoolFn,
                                     ResNet,
                                     native_max_pool,
                                     resnet18,
                                     resnet50,
                                     torch_nearest_resize,
)
from autolora_jax.models.vit import (
                                     LORA_INITS,
                                     LORA_TARGETS,
                                     VIT_SIZES,
                                     VIT_STEMS,
                                     VITS,
                                     LoRaDense,
                                     ViT,
                                     dense_lora_delta,
                                     fit_pretrained,
                                     lora_a_init,
                                     resample_pos_embed,
                                     vit_b16,
                                     vit_s16,
                                     vit_size,
)

collect(_importlib.import_module(f'{__name__}.{m.name}') for m in _pkgutil.iter_modules(__path__))

__all__ = [
    'ATTENTION_IMPLS', 'attend', 'attention_for',
    'ARCHITECTURES', 'BRANCHES', 'IMAGENET_MEAN', 'IMAGENET_STD', 'LORA_PLACEMENTS', 'PRECISIONS', 'STEMS',
    'TWIN_MODES', 'BasicBlock', 'BatchNorm', 'Bottleneck', 'ConvFn', 'LoRaConv', 'PoolFn', 'ResNet',
    'create_model',
    'kaiming_normal_fan_out', 'lora_delta', 'lora_params_count', 'native_conv2d', 'native_max_pool',
    'param_group', 'param_groups', 'resnet18', 'resnet50', 'torch_nearest_resize', 'TwinBatchNorm',
    'frozen_twin_source', 'RESNETS', 'VITS', 'is_vit', 'vit_size', 'ViT', 'LoRaDense', 'LORA_TARGETS', 'LORA_INITS',
    'VIT_SIZES', 'VIT_STEMS', 'dense_lora_delta', 'resample_pos_embed', 'lora_a_init', 'fit_pretrained', 'vit_s16', 'vit_b16',
    'ArchSpec', 'ArchView', 'arch_names', 'register', 'spec', 'specs', 'unregister',
]
