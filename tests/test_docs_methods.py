"""docs/methods.md's "Writing a method of your own": its example runs as written, through the training loop,
the workdir's resume check and --mode=eval's evaluation."""

import importlib.util
import os
import re

import pytest

from autolora_jax import config_checks, evaluation, methods, reporting, train, workdir
from autolora_jax.errors import ConfigError
from tests import tiny_runs

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'methods.md')


def example_code() -> str:
  """The first python code block of the section "Writing a method of your own"."""
  with open(DOC) as f:
    text = f.read()
  section = text.split('## Writing a method of your own', 1)[1].split('\n## ', 1)[0]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.fixture()
def my_trades(tmp_path):
  path = tmp_path / 'my_trades.py'
  path.write_text(example_code())
  spec = importlib.util.spec_from_file_location('my_trades', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  yield module
  methods.unregister('trades')


def test_the_example_registers_a_method_with_its_config_section(my_trades):
  assert 'trades' in methods.names() and methods.get('trades') is my_trades.TRADES
  config = my_trades.get_config()
  assert config.method == 'trades' and config.trades.beta == 6.0
  config_checks.validate(config)
  config.trades.beta = -1.0
  with pytest.raises(ConfigError, match='config.trades.beta'):
    config_checks.validate(config)
  # A run of another method that began before config.trades existed resumes.
  other = workdir.config_dict(tiny_runs.tiny_config())
  assert workdir.config_differences({k: v for k, v in other.items() if k != 'trades'}, other) == []


@pytest.mark.slow
def test_the_example_runs_through_train_and_evaluate(my_trades, tmp_path):
  del my_trades  # registered: tiny_config's get_config adds config.trades
  config = tiny_runs.tiny_config(method='trades', **{'trades.epochs': 2, 'trades.boundaries': (1,)})
  config.autoattack.enabled = False
  run = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, run)
  assert results['method'] == 'trades' and results['trades'] == {'beta': 6.0}
  records = reporting.MetricsLog(run).read()
  assert [r['epoch'] for r in records] == [0, 1, 2] and 'train_kl' in records[1]
  assert train.train_and_evaluate(config, run)['final'] == results['final']  # a finished run: resumed, same
  evaluated = evaluation.evaluate_workdir(config, run)
  assert evaluated['final']['test']['clean'] == results['final']['test']['clean']
