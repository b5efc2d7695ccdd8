"""The command-line bootstrap every entry point uses (`cli.run_command`): a command's main gets the command that
repeats it, and the package's errors end in a one-paragraph message and their exit status."""

import os
import subprocess
import sys

import pytest

from autolora_jax import preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMAND = '''
import sys
from absl import flags
from autolora_jax import cli, errors
flags.DEFINE_string('what', 'ok', '')
flags.DEFINE_bool('skip', False, '')
def main(command):
  what = flags.FLAGS.what
  if what == 'input':
    raise errors.ConfigError('config.x is wrong: set it right.')
  if what == 'nan':
    raise errors.NonFiniteLossError('Non-finite loss at epoch 2.')
  if what == 'stop':
    raise errors.Preempted('Stopped by SIGTERM.', epoch=2, step=3, checkpoint_step=9)
  print('COMMAND', command, flags.FLAGS.compilation_cache)
cli.run_command(main, 'Pass --what=...', 'some.module', stopped='Again: {command}', failed='Retry: {command}',
                omit=('--skip',))
'''


@pytest.fixture
def run(tmp_path):
  (tmp_path / 'some_command.py').write_text(COMMAND)
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  return lambda *args: subprocess.run([sys.executable, 'some_command.py', *args], cwd=tmp_path, capture_output=True,
                                      text=True, timeout=300, env=env)


@pytest.mark.parametrize('what,status,message', [
    ('input', 2, 'error: config.x is wrong: set it right.\n'),
    ('nan', 1, 'error: Non-finite loss at epoch 2.\nRetry: python some_command.py --what=nan --compilation_cache=\n'),
    ('stop', preemption.EXIT_CODE, 'Stopped by SIGTERM.\nAgain: python some_command.py --what=stop --compilation_cache=\n'),
])
def test_errors_end_in_their_message_and_status(run, what, status, message):
  p = run(f'--what={what}', '--skip', '--compilation_cache=')
  assert p.returncode == status and p.stderr.endswith(message), p.stderr
  assert 'Traceback' not in p.stderr


def test_main_gets_the_command_and_flags_and_bad_arguments_are_refused(run):
  p = run('--what=ok', '--compilation_cache=')
  assert p.returncode == 0 and p.stdout == 'COMMAND python some_command.py --what=ok --compilation_cache= \n', p.stderr
  p = run('positional')
  assert p.returncode == 2, p.stderr
  assert p.stderr == "error: unexpected arguments ['positional']: flags take the form --name=value.\n"
  p = run('--wat=1')
  assert p.returncode == 2 and p.stderr.startswith('error: ') and 'Pass --what=...' in p.stderr
