"""The installable trainer: the packaged configs by name (`cli.resolve_config`), the `autolora-train` entry
point (autolora_jax/main.py) from a folder outside the checkout, and a wheel that carries both."""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from autolora_jax import cli
from autolora_jax import main as train_main
from autolora_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = os.path.join(ROOT, 'autolora_jax', 'configs')


def _packaged(name):
  return os.path.join(cli.CONFIGS_DIR, name + '.py')


# -- the config lookup -------------------------------------------------------------------------------------

def test_configs_dir_is_the_package_folder_and_the_checkout_link():
  assert os.path.samefile(cli.CONFIGS_DIR, PACKAGED)
  assert os.path.samefile(os.path.join(ROOT, 'configs'), PACKAGED)  # the checkout's configs/ link
  names = cli.available_configs()
  assert {'default', 'demo', 'cifar10', 'fashion_mnist'} <= set(names) and '__init__' not in names
  assert names == sorted(names)


def test_a_bare_name_or_name_py_means_the_packaged_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config('demo') == _packaged('demo')
  assert cli.resolve_config('demo.py') == _packaged('demo')
  assert cli.resolve_config('cifar10:ARG') == _packaged('cifar10') + ':ARG'  # a config's argument is kept
  cli.check_config_file(['prog', '--config=demo'])


def test_an_existing_path_is_used_as_given(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  own = tmp_path / 'mine.py'
  own.write_text('from autolora_jax.configs import default\nget_config = default.get_config\n')
  assert cli.resolve_config(str(own)) == str(own)
  assert cli.resolve_config('mine.py') == 'mine.py'
  assert cli.resolve_config('mine.py:x') == 'mine.py:x'
  (tmp_path / 'demo.py').write_text('')  # a file of the packaged config's name in the cwd wins
  assert cli.resolve_config('demo.py') == 'demo.py'
  monkeypatch.chdir(ROOT)  # the checkout: configs/NAME.py exists (through the link) and is used as given
  assert cli.resolve_config('configs/demo.py') == 'configs/demo.py'


def test_configs_name_py_falls_back_to_the_packaged_config_elsewhere(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config('configs/demo.py') == _packaged('demo')
  assert cli.resolve_config('./configs/fashion_mnist.py') == _packaged('fashion_mnist')
  assert cli.resolve_config('other/demo.py') is None  # only configs/NAME.py, no other folder
  assert cli.resolve_config('/nowhere/configs/demo.py') is None
  (tmp_path / 'demo').mkdir()  # a folder of the config's name (a workdir) is no config
  assert cli.resolve_config('demo') == _packaged('demo')


def test_an_unknown_config_is_an_error_listing_the_packaged_ones(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config('nope') is None
  with pytest.raises(ConfigError) as e:
    cli.check_config_file(['prog', '--config=nope'])
  message = str(e.value)
  assert message.startswith('the config file nope (') and 'no packaged config is named nope' in message
  assert ', '.join(cli.available_configs()) in message and 'demo, dogs' in message
  assert '--config=NAME' in message and '--config=PATH/TO/FILE.py' in message and '\n' not in message
  with pytest.raises(ConfigError, match='the config file mine/x.py .* does not exist. Pass --config=NAME'):
    cli.check_config_file(['prog', '--config', 'mine/x.py'])


def test_the_argv_rewrite(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = ['--config=demo:A', '--config.seed=3', '--workdir=w', '-config', 'configs/cifar10.py', '--config', 'x']
  assert cli.resolve_config_argv(argv) == [
      f'--config={_packaged("demo")}:A', '--config.seed=3', '--workdir=w', '-config', _packaged('cifar10'),
      '--config', 'x']  # an unknown value stays: check_config_file reports the last one


def test_the_resume_command_names_the_command_used(tmp_path, monkeypatch):
  from autolora_jax.compare import cli as compare_cli  # pylint: disable=g-import-not-at-top
  assert cli.command_prefix('run.py', train_main.MODULE) == ['python', 'run.py']
  assert cli.command_prefix(train_main.__file__, train_main.MODULE) == ['python', '-m', 'autolora_jax.main']
  main_file = os.path.join(os.path.dirname(compare_cli.__file__), '__main__.py')  # python -m of a package
  assert cli.command_prefix(main_file, compare_cli.MODULE) == ['python', '-m', 'autolora_jax.compare']
  for name, module in (('autolora-train', train_main.MODULE), ('autolora-compare', compare_cli.MODULE)):
    script = tmp_path / 'bin' / name
    script.parent.mkdir(exist_ok=True)
    script.write_text('#!/bin/sh\n')
    script.chmod(0o755)
    monkeypatch.setenv('PATH', str(script.parent))
    assert cli.command_prefix(str(script), module) == [name]  # on PATH: its name
    monkeypatch.setenv('PATH', str(tmp_path))
    assert cli.command_prefix(str(script), module) == [str(script)]  # not on PATH: its path
  argv = ['autolora-train', '--config=demo', '--overwrite', '--workdir=a b']
  monkeypatch.setattr(cli, 'command_prefix', lambda argv0, module: [argv0])
  assert cli.command_line(train_main.MODULE, argv, omit=('--overwrite',)) == \
      "autolora-train --config=demo '--workdir=a b'"


# -- the entry points from a folder outside the checkout ---------------------------------------------------

def _run(args, cwd):
  env = {**os.environ, 'PYTHONPATH': ROOT}  # the package itself (it is installed editable anyway)
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize('config', ['demo', 'demo.py', 'configs/demo.py'])
def test_train_loads_the_packaged_config_outside_the_checkout(tmp_path, config):
  # A misspelt override is refused only after the config loaded: the error proves that it was found.
  p = _run(['-m', 'autolora_jax.main', f'--config={config}', f'--workdir={tmp_path / "w"}',
            '--config.model.widht=3'], cwd=tmp_path)
  assert p.returncode == 2, p.stderr
  assert 'Did you mean "width" instead of "widht"' in p.stderr and 'Traceback' not in p.stderr
  assert not (tmp_path / 'w').exists()


def test_train_and_compare_take_own_config_files_and_refuse_unknown_names(tmp_path):
  own = tmp_path / 'mine.py'
  own.write_text('from autolora_jax.configs import demo\n\n\ndef get_config():\n  return demo.get_config()\n')
  for module in ('autolora_jax.main', 'autolora_jax.compare'):
    p = _run(['-m', module, f'--config={own}', f'--workdir={tmp_path / "w"}', '--config.modle.width=3'],
             cwd=tmp_path)
    assert p.returncode == 2 and 'Did you mean "model"' in p.stderr, p.stderr
    p = _run(['-m', module, '--config=nope', f'--workdir={tmp_path / "w"}'], cwd=tmp_path)
    assert p.returncode == 2 and 'Traceback' not in p.stderr
    assert p.stderr.startswith('error: the config file nope') and 'demo, dogs' in p.stderr, p.stderr
  p = _run([os.path.join(ROOT, 'run.py'), '--config=demo', f'--workdir={tmp_path / "w"}',
            '--config.model.widht=3'], cwd=tmp_path)  # run.py is the same command
  assert p.returncode == 2 and 'instead of "widht"' in p.stderr, p.stderr
  assert not (tmp_path / 'w').exists()


# -- the wheel -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_the_train_command(tmp_path):
  # A copy of what the wheel is built from, so that the build leaves nothing in the checkout (build/, egg-info).
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), src / name)
  shutil.copytree(os.path.join(ROOT, 'autolora_jax'), src / 'autolora_jax',
                  ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  try:  # the environment's setuptools when it has one (no download); else pip fetches it
    import setuptools  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    isolation = ['--no-build-isolation']
  except ImportError:
    isolation = []
  out = tmp_path / 'wheels'
  p = subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(src), '--no-deps', *isolation, '-q',
                      '-w', str(out)], capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  wheels = list(out.glob('autolora_jax-*.whl'))
  assert len(wheels) == 1, os.listdir(out)
  with zipfile.ZipFile(wheels[0]) as z:
    names = set(z.namelist())
    for name in ('__init__', 'default', 'demo', 'fashion_mnist', 'cifar10'):
      assert f'autolora_jax/configs/{name}.py' in names
    assert 'autolora_jax/main.py' in names and 'autolora_jax/cli.py' in names
    assert not any(n.startswith(('configs/', 'tests/')) for n in names)
    entry_points = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
    text = z.read(entry_points).decode()
  assert 'autolora-train = autolora_jax.main:run' in text
  assert 'autolora-compare = autolora_jax.compare:run_cli' in text


def test_one_version_number_read_from_the_package_metadata():
  import autolora_jax  # pylint: disable=import-outside-toplevel
  with open(os.path.join(ROOT, 'pyproject.toml')) as f:
    declared = re.search(r'^version = "(.+)"$', f.read(), re.M).group(1)
  assert autolora_jax.__version__ == declared
  with open(os.path.join(ROOT, 'CITATION.cff')) as f:
    assert f'version: "{declared}"' in f.read()
