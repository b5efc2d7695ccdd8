"""The LoRa ResNet (resnet.py), its convolution (lora.py), BatchNorm (batchnorm.py) and parameter groups
(groups.py). The model knows no backend: the convolution and max-pool are arguments (`conv_fn`,
`pool_fn`, XLA's by default); autolora_jax.ops provides the CPU ones."""

from autolora_jax.models.batchnorm import TWIN_MODES, BatchNorm, TwinBatchNorm, frozen_twin_source
from autolora_jax.models.groups import lora_params_count, param_group, param_groups
from autolora_jax.models.lora import ConvFn, LoRaConv, kaiming_normal_fan_out, lora_delta, native_conv2d
from autolora_jax.models.resnet import (ARCHITECTURES, BRANCHES, IMAGENET_MEAN, IMAGENET_STD, LORA_PLACEMENTS,
                                        PRECISIONS, STEMS, BasicBlock, Bottleneck, PoolFn, ResNet, create_model,
                                        native_max_pool, resnet18, resnet50, torch_nearest_resize)

__all__ = [
    'ARCHITECTURES', 'BRANCHES', 'IMAGENET_MEAN', 'IMAGENET_STD', 'LORA_PLACEMENTS', 'PRECISIONS', 'STEMS',
    'TWIN_MODES', 'BasicBlock', 'BatchNorm', 'Bottleneck', 'ConvFn', 'LoRaConv', 'PoolFn', 'ResNet',
    'create_model',
    'kaiming_normal_fan_out', 'lora_delta', 'lora_params_count', 'native_conv2d', 'native_max_pool',
    'param_group', 'param_groups', 'resnet18', 'resnet50', 'torch_nearest_resize', 'TwinBatchNorm',
    'frozen_twin_source',
]
