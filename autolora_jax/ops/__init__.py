"""CPU speed, apart from the model: convolutions and max-pooling with fast gradients (conv.py), Winograd
3 x 3 convolutions (winograd.py), the per-layer choice of `config.model.conv_impl` (cpu.py:
`convolutions(conv_impl, backend) -> (conv_fn, pool_fn)` for models.ResNet) and process-wide host settings
(host.py). Knows no model: every function here takes and returns arrays."""

from autolora_jax.ops import conv, cpu, host, winograd
from autolora_jax.ops.cpu import CONV_IMPLS, convolutions

__all__ = ['CONV_IMPLS', 'conv', 'convolutions', 'cpu', 'host', 'winograd']
