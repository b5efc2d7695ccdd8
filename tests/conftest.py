"""Test set-up: quiet TensorFlow and a persistent XLA compilation cache (pyproject.toml puts the repository
root and tests/ on the import path: `import tiny_runs`; the configs are the package's,
`from autolora_jax.configs import default`).

After each test module the compiled programs are released (`jax.clear_caches`): every program XLA compiles
for the CPU maps memory of its own, and one process running the whole suite otherwise passes the kernel's
limit on memory maps (vm.max_map_count, 65,530 by default), where XLA's compiler aborts.

The cache (in the system's temp folder, keyed by program and JAX version) lets the many tests that compile
the same small train and eval steps, subprocesses included, compile each program once.
"""

import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'autolora-jax-test-xla'))
# What compiles in milliseconds (the operations run outside jit) is not written: with thousands of entries
# every write to the bounded cache, which reads each entry's size and time, takes longer than a compile.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
# A bounded cache is a locked one: the processes of the multi-process tests read and write it at once.
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))


import gc

import pytest


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  yield
  import jax  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  gc.collect()


def pytest_collection_modifyitems(config, items):
  """With pytest-xdist (`-n N`), the files with the most `slow` tests go first: the workers then finish
  together instead of one running a long file at the end while the others idle. Within a file, and without
  xdist, the order is the usual one."""
  del config
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    return
  slow = {}
  for item in items:
    slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker('slow') is not None)
  items.sort(key=lambda item: -slow[item.path])  # stable: each file's own order is kept
