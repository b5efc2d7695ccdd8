"""Test set-up: quiet TensorFlow and a persistent XLA compilation cache (pyproject.toml puts the repository
root and tests/ on the import path: `import tiny_runs`; the configs are the package's,
`from autolora_jax.configs import default`).

The cache (in the system's temp folder, keyed by program and JAX version) lets the many tests that compile
the same small train and eval steps, subprocesses included, compile each program once.
"""

import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'autolora-jax-test-xla'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
