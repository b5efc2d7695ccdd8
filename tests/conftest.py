"""Test set-up: the repository root and tests/ on sys.path, quiet TensorFlow, and a persistent XLA compilation cache.

The cache (in the system's temp folder, keyed by program and JAX version) lets the many tests that compile
the same small train and eval steps, subprocesses included, compile each program once.
"""

import os
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for path in (TESTS, ROOT):  # `from tests import helpers` and the fault-tolerance tests' `import tiny_runs`
  if path not in sys.path:
    sys.path.insert(0, path)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'autolora-jax-test-xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
