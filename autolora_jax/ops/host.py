"""Process-wide host settings that make a run on the CPU faster, and the persistent compilation cache.

XLA's CPU backend (and PyTorch's) allocates fresh buffers of tens to hundreds of MB for every step. glibc's
malloc serves allocations above its mmap threshold (at most 32 MB) with a new mmap and returns them to the
kernel when freed, so every step pays a page fault for every 4 KB page it writes. On virtual machines a
page fault is expensive: on this project's 2-core machines, filling a fresh 57 MB buffer took 70-90 ms
against 3 ms for a reused one, and the AutoLoRa train step of ResNet-18 at 32 x 32 ran 3.7x faster once
freed memory was kept for reuse (benchmarks/step.py). `retain_freed_memory` makes malloc keep it.

XLA's worker threads would otherwise allocate from per-thread arenas, whose heaps of at most 64 MB glibc
unmaps as soon as they are wholly free, whatever the trim threshold; so all threads share the main one. On a
2-core AVX2 machine that took the page faults of the ResNet-18 train step at 224 x 224, batch 32, from
~369,000 per step (1.4 GB) to at most a few thousand.

`set_xla_cpu_flags` runs convolutions on XLA's own CPU kernels instead of the YNNPACK library that jaxlib
0.10 sends them to by default (matrix products stay with YNNPACK). On a 2-core AVX2 machine, batch 32: a
56 x 56 x 64 3 x 3 convolution 96 -> 50 ms, the ResNet-18 stem 99 -> 75 ms, a 7 x 7 x 512 one 60 -> 46 ms
(see docs/benchmarks.md). Turning YNNPACK off for matrix products as well made no difference to the step.

Both settings are for runs whose computations are on the CPU: on GPU and TPU hosts they change nothing
(`cpu_backend_expected` decides without starting a JAX backend, so that the XLA flags can still take
effect). The compilation cache (`enable_compilation_cache`) serves every backend.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import warnings
from typing import Optional

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _accelerator_plugin_installed() -> bool:
  """Whether JAX would find a GPU or TPU runtime to start: a PJRT plugin (the CUDA and ROCm ones, under
  the jax_plugins namespace or entry-point group), one named in PJRT_NAMES_AND_LIBRARY_PATHS, or libtpu.
  Looks at what is installed only; imports and starts nothing."""
  if os.environ.get('PJRT_NAMES_AND_LIBRARY_PATHS') or os.environ.get('TPU_LIBRARY_PATH'):
    return True
  if importlib.util.find_spec('libtpu') is not None:
    return True
  if importlib.metadata.entry_points(group='jax_plugins'):
    return True
  namespace = importlib.util.find_spec('jax_plugins')
  paths = list(namespace.submodule_search_locations or []) if namespace is not None else []
  return any(True for _ in pkgutil.iter_modules(paths))


def cpu_backend_expected(backend: Optional[str] = None) -> bool:
  """Whether this process's computations will run on the CPU, decided without starting a JAX backend.

  `backend` (e.g. 'cpu', 'gpu', 'tpu'), where the caller knows it, decides. Otherwise: JAX's default
  backend if JAX has started its backends; else the first platform of JAX_PLATFORMS (jax.config's
  jax_platforms) if set; else the CPU exactly when no GPU or TPU runtime is installed (JAX prefers one).
  A host with an accelerator runtime but no device gets False: set JAX_PLATFORMS=cpu there.
  """
  if backend is not None:
    return backend == 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    return jax.default_backend() == 'cpu'
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not _accelerator_plugin_installed()


def retain_freed_memory(backend: Optional[str] = None) -> bool:
  """Makes glibc's malloc reuse freed memory instead of unmapping it (no mmap, no trimming of the heap,
  one arena for all threads), for runs on the CPU.

  Freed memory stays in the process (its resident size stays at its peak) and is reused by the next
  allocations, which then need no page faults. Affects every later allocation of the process, XLA's and
  others'. Returns whether it did: False, changing nothing, off the CPU (`cpu_backend_expected(backend)`)
  and where the C library is not glibc.
  """
  if not cpu_backend_expected(backend):
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok  # -1: SIZE_MAX, never trim
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1 and ok  # threads started later share the main arena
  except (OSError, AttributeError):
    return False
  return ok


# Convolutions on XLA's own CPU kernels; only matrix products go to YNNPACK (XLA's upstream default).
XLA_CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=individual_dot',)


def set_xla_cpu_flags(backend: Optional[str] = None) -> bool:
  """Adds XLA_CPU_FLAGS to the XLA_FLAGS environment variable, keeping every flag the user set there (a
  flag already named in XLA_FLAGS is not added again), for runs on the CPU.

  Takes effect only when called before JAX starts its backends (before the first computation); returns
  whether the flags are in force: False, changing nothing, off the CPU (`cpu_backend_expected(backend)`)
  and, with a warning, when the backends had started already.
  """
  if not cpu_backend_expected(backend):
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    warnings.warn('host.set_xla_cpu_flags() was called after JAX started its backends; call it before '
                  'the first computation for the CPU convolution settings to take effect.')
    return False
  current = os.environ.get('XLA_FLAGS', '')
  names = {f.split('=')[0] for f in current.split()}
  added = [f for f in XLA_CPU_FLAGS if f.split('=')[0] not in names]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current] + added).strip()
  return True


CACHE_MAX_BYTES = 4 << 30  # 4 GiB of compiled programs: some hundred configs' train and eval programs.
# Programs that compile faster than this are not written: the single operations run outside jit (an init, a
# reshape) compile in milliseconds, and every write to a bounded cache reads the size and time of each entry.
CACHE_MIN_COMPILE_SECS = 0.1


def default_compilation_cache_dir() -> str:
  """The user's cache folder for compiled programs: $XDG_CACHE_HOME/autolora-jax/xla (~/.cache/...)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'autolora-jax', 'xla')


def enable_compilation_cache(path: str) -> bool:
  """JAX's persistent compilation cache in `path`: a program compiled once (keyed by its computation, the
  JAX version and the device) is read from disk by later runs, so a second run of a config and
  `--mode=eval` compile only what compiled in under CACHE_MIN_COMPILE_SECS (single operations run outside
  jit), which is not written (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS wins). A
  JAX_COMPILATION_CACHE_DIR the user set wins, an empty one included. '' leaves the cache off. Returns whether
  the cache is on.

  The cache is bounded (CACHE_MAX_BYTES, least recently used entries evicted; JAX_COMPILATION_CACHE_MAX_SIZE
  wins): with a bound JAX takes a file lock around every read and write, so the processes of a multi-process
  run on one host, or two runs side by side, never read an entry another one is still writing.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get('JAX_COMPILATION_CACHE_DIR', path)
  if not path:
    return False
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    warnings.warn(f'The compilation cache folder {path} cannot be created ({e.strerror or e}); programs are '
                  'compiled afresh. Pass --compilation_cache=DIR with a folder you can write, or '
                  '--compilation_cache= to turn the cache off.')
    return False
  jax.config.update('jax_compilation_cache_dir', path)
  if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:
    jax.config.update('jax_compilation_cache_max_size', CACHE_MAX_BYTES)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', CACHE_MIN_COMPILE_SECS)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return True
