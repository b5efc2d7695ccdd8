"""autolora_jax.methods: the registry, and the public names that read it."""

import dataclasses

import pytest

from autolora_jax import experiment, methods, steps, workdir
from autolora_jax.configs import default
from autolora_jax.errors import ConfigError

BUILT_IN = ('autolora', 'vanilla_rft', 'pgd_at', 'twins', 'lora_at')


def test_built_in_methods_and_the_names_that_read_the_registry():
  assert methods.names()[:5] == BUILT_IN
  assert steps.METHODS == methods.names() and steps.TWINS_LOSSES == ('at', 'trades')
  assert all(methods.get(n).name == n for n in BUILT_IN)
  assert [n for n in BUILT_IN if methods.get(n).in_default_comparison] == list(BUILT_IN[:4])
  assert [n for n in BUILT_IN if methods.get(n).needs_batchnorm] == ['twins']
  assert {n: methods.get(n).title for n in BUILT_IN} == {
      'autolora': 'AutoLoRa', 'vanilla_rft': 'vanilla RFT', 'pgd_at': 'PGD-AT', 'twins': 'TWINS',
      'lora_at': 'LoRa-AT'}
  assert experiment.Twins is methods.twins.Twins


def test_an_unknown_name_is_one_clear_config_error():
  with pytest.raises(ConfigError) as e:
    methods.get('autolora2')
  message = str(e.value)
  assert "config.method='autolora2' is not supported" in message and '\n' not in message
  assert all(n in message for n in BUILT_IN) and 'methods.register' in message


def test_register_refuses_another_method_under_a_taken_name():
  clash = dataclasses.replace(methods.get('pgd_at'), make_loss=methods.get('autolora').make_loss)
  with pytest.raises(ValueError, match="'pgd_at' is registered already"):
    methods.register(clash)
  assert methods.register(methods.get('pgd_at')) is methods.get('pgd_at')  # the same one again: fine
  with pytest.raises(TypeError):
    methods.register({'name': 'x'})


def test_every_method_section_is_in_the_default_config_and_unread_sections_resume():
  config = default.get_config()
  for name in ('auto_lr', 'auto_scalars', 'fixed', 'twins', 'lora_at'):
    assert name in config
  assert methods.unread_sections('autolora') == ('fixed', 'twins', 'lora_at')
  assert methods.unread_sections('twins') == ('auto_lr', 'auto_scalars', 'fixed', 'lora_at')
  new = workdir.config_dict(config)
  old = {k: v for k, v in new.items() if k not in ('lora_at', 'twins')}
  assert workdir.config_differences(old, new) == []
  lora = workdir.config_dict(default.get_config())
  lora['method'] = 'lora_at'
  assert workdir.config_differences(old, lora)[-1].startswith('method:')
  assert any(d.startswith('lora_at.lr:') for d in workdir.config_differences(old, lora))


def test_a_method_registered_after_the_config_was_made_is_a_clear_error():
  from autolora_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  late = dataclasses.replace(methods.get('lora_at'), name='late_method', sections=('late',))
  methods.register(late)
  try:
    config.method = 'late_method'
    with pytest.raises(ConfigError, match='reads config.late, which this config lacks'):
      config_checks.validate(config)
  finally:
    methods.unregister('late_method')


def test_experiment_methods_is_the_registry_too():
  assert experiment.METHODS == methods.names()
