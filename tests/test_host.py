"""ops.host: malloc keeps freed memory for worker threads too, the XLA CPU flags are added without touching
the user's own, and neither setting is made off the CPU (decided without starting a backend)."""

import os
import platform
import subprocess
import sys
import textwrap
import warnings

import jax
import pytest
from jax._src import xla_bridge

from autolora_jax.ops import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A worker thread allocates and frees a 100 MB array ten times after warming up; prints its page faults
# per allocation. Without retain_freed_memory glibc maps every such block afresh (and with it, it used to
# unmap wholly free per-thread heaps); with it the thread reuses the same pages.
_FAULTS = textwrap.dedent('''
    import resource, sys, threading
    import numpy as np
    from autolora_jax.ops import host
    if {retain}:
      assert host.retain_freed_memory('cpu')
    def work(out):
      for _ in range(3):
        np.ones(100 * 2**20 // 8)
      before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
      for _ in range(10):
        np.ones(100 * 2**20 // 8)
      out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 10)
    out = []
    thread = threading.Thread(target=work, args=(out,))
    thread.start()
    thread.join()
    print(out[0])
''')


def _faults_per_allocation(retain):
  code = _FAULTS.format(retain=retain)
  return float(subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True,
                              env={**os.environ, 'PYTHONPATH': ROOT}).stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_retain_freed_memory_removes_the_page_faults_of_a_worker_threads_allocations():
  assert _faults_per_allocation(retain=False) > 0
  assert _faults_per_allocation(retain=True) == 0


def test_set_xla_cpu_flags_adds_its_flags_and_keeps_the_users(monkeypatch):
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  name = host.XLA_CPU_FLAGS[0].split('=')[0]
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  assert host.set_xla_cpu_flags('cpu')
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=4', *host.XLA_CPU_FLAGS]
  # A flag the user named keeps the user's value, and calling again adds nothing.
  monkeypatch.setenv('XLA_FLAGS', f'{name}=individual_dot')
  assert host.set_xla_cpu_flags('cpu')
  assert os.environ['XLA_FLAGS'] == f'{name}=individual_dot'
  monkeypatch.delenv('XLA_FLAGS')
  assert host.set_xla_cpu_flags('cpu') and host.set_xla_cpu_flags('cpu')
  assert os.environ['XLA_FLAGS'].split() == list(host.XLA_CPU_FLAGS)


def test_set_xla_cpu_flags_after_the_backends_started_warns_and_changes_nothing(monkeypatch):
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    assert not host.set_xla_cpu_flags()  # this test process runs on the CPU: the backend it started
  assert any('before the first computation' in str(w.message) for w in caught)
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'


@pytest.fixture
def jax_platforms():
  """Sets jax.config's jax_platforms (as JAX_PLATFORMS does) for one test and restores it after."""
  before = jax.config.jax_platforms
  yield lambda value: jax.config.update('jax_platforms', value)
  jax.config.update('jax_platforms', before)


def test_off_the_cpu_neither_setting_is_made(monkeypatch, jax_platforms):
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  monkeypatch.setattr(host.ctypes, 'CDLL', lambda *_: pytest.fail('mallopt called off the CPU'))
  for backend in ('gpu', 'tpu'):
    assert not host.retain_freed_memory(backend) and not host.set_xla_cpu_flags(backend)
  for platforms in ('cuda', 'tpu', 'cuda,cpu'):  # JAX_PLATFORMS: the first platform is the default one
    jax_platforms(platforms)
    assert not host.cpu_backend_expected()
    assert not host.retain_freed_memory() and not host.set_xla_cpu_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'


def test_the_cpu_is_expected_from_jax_platforms_or_the_installed_runtimes(monkeypatch, jax_platforms):
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: False)
  jax_platforms('cpu,cuda')
  assert host.cpu_backend_expected()
  jax_platforms(None)  # unset: JAX prefers an installed GPU or TPU runtime
  monkeypatch.setattr(host, '_accelerator_plugin_installed', lambda: True)
  assert not host.cpu_backend_expected()
  monkeypatch.setattr(host, '_accelerator_plugin_installed', lambda: False)
  assert host.cpu_backend_expected()
  # Once JAX has started, its default backend decides, whatever JAX_PLATFORMS and the runtimes say.
  monkeypatch.setattr(xla_bridge, 'backends_are_initialized', lambda: True)
  jax_platforms('tpu')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert host.cpu_backend_expected()
  jax_platforms('cpu')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not host.cpu_backend_expected()
