"""Fine-tuning methods as values, and the registry that names them.

    from autolora_jax import methods
    methods.names()                   # ('autolora', 'vanilla_rft', 'pgd_at', 'twins', 'lora_at')
    method = methods.get('twins')     # a `Method`: loss, model overrides, policy, config section, ...
    methods.register(my_method)       # a method of your own, run by name (config.method)

Each built-in method is one module here (autolora, vanilla_rft, pgd_at, twins, lora_at) that defines its
`METHOD`; docs/methods.md describes them and how to write one.
"""

from autolora_jax.methods import autolora, lora_at, pgd_at, twins, vanilla_rft
from autolora_jax.methods.core import (
  LossContext,
  LossFn,
  Method,
  add_config_sections,
  defined_sections,
  fixed_schedule_policy,
  get,
  names,
  optim_weight_decay,
  register,
  registered,
  unread_sections,
  unregister,
)

for _module in (autolora, vanilla_rft, pgd_at, twins, lora_at):
  register(_module.METHOD)
del _module

__all__ = ['LossContext', 'LossFn', 'Method', 'add_config_sections', 'defined_sections', 'fixed_schedule_policy',
           'get', 'names', 'optim_weight_decay', 'register', 'registered', 'unread_sections', 'unregister']
