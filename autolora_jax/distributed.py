"""Multi-process (multi-host) runs: when to call `jax.distributed.initialize()`, and with what.

A run is multi-process when several copies of run.py, one per host (or per GPU), train one model together.
Each process then feeds its local devices with its rows of every global batch (autolora_jax/data), the pmapped
steps reduce over the devices of all processes, Orbax checkpoints are saved collectively, and only process 0
writes metrics, plots and results.

`config.distributed.initialize` decides whether this module calls `jax.distributed.initialize()`:

* 'auto' (default): when a coordinator address or a process count > 1 is given (config or environment,
  below), or when JAX's own cluster detection (Slurm, Open MPI, Cloud TPU pod slices, Kubernetes) finds a
  job of more than one process;
* 'always': always (a single-host job then still gets JAX's preemption notices, for instance);
* 'never': never (one process; the default when none of the above is present).

Settings, each from config.distributed or else from the environment, else left to JAX's cluster detection:
coordinator_address ('host:port' of process 0; env JAX_COORDINATOR_ADDRESS), num_processes (env
JAX_NUM_PROCESSES) and process_id (0 .. num_processes - 1; env JAX_PROCESS_ID).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Callable, Optional, Sequence, Tuple

import jax

from autolora_jax.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ('auto', 'always', 'never')
ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
       'process_id': 'JAX_PROCESS_ID'}


def settings(d) -> dict:
  """{'coordinator_address', 'num_processes', 'process_id'} from `d` (config.distributed) or the
  environment; None where neither gives a value (JAX's cluster detection then fills it in)."""
  out = {'coordinator_address': d.coordinator_address or os.environ.get(ENV['coordinator_address']) or None}
  for key, unset in (('num_processes', 0), ('process_id', -1)):
    value = d[key]
    if value == unset:
      raw = os.environ.get(ENV[key], '').strip()
      if not raw:
        value = None
      else:
        try:
          value = int(raw)
        except ValueError:
          raise ConfigError(f'The environment variable {ENV[key]}={raw!r} is not an integer: set it to the '
                            f'{key.replace("_", " ")} of this process or unset it.') from None
    out[key] = value
  return out


def detected_cluster() -> Optional[tuple]:
  """(name, process count) of the cluster job JAX's own detection finds, or None outside one.

  Uses JAX's cluster environments (the ones `jax.distributed.initialize()` consults without arguments);
  a JAX version without them, or an environment that cannot say its size, counts as none.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if not env.opt_in_only_method and env.is_env_present():
        return env.name or env.__name__, int(env.get_process_count())
  except Exception as e:  # pylint: disable=broad-except
    log.debug('No cluster detected (%s)', e)
  return None


def check(d) -> None:
  """Raises ConfigError for inconsistent distributed settings `d` (config.distributed; cheap, no network)."""
  if d.initialize not in MODES:
    raise ConfigError(f'config.distributed.initialize={d.initialize!r} is not supported: choose one of '
                      f'{MODES}.')
  s = settings(d)
  n, pid = s['num_processes'], s['process_id']
  if n is not None and n < 1:
    raise ConfigError(f'config.distributed.num_processes={n} (or {ENV["num_processes"]}) must be >= 1.')
  if pid is not None and (pid < 0 or (n is not None and pid >= n)):
    raise ConfigError(f'The process id {pid} (config.distributed.process_id or {ENV["process_id"]}) must lie '
                      f'in [0, num_processes={n}): give each process its own id 0 .. {(n or 1) - 1}.')
  if n is not None and n > 1 and d.initialize == 'never':
    raise ConfigError(f'num_processes={n} asks for a multi-process run but config.distributed.initialize='
                      "'never': set it to 'auto'.")


def wanted(d) -> bool:
  """Whether this process should call jax.distributed.initialize() for settings `d` (config.distributed;
  see the module docstring)."""
  if d.initialize != 'auto':
    return d.initialize == 'always'
  s = settings(d)
  if s['coordinator_address'] or (s['num_processes'] or 1) > 1:
    return True
  cluster = detected_cluster()
  return cluster is not None and cluster[1] > 1


def initialize(d) -> bool:
  """Calls jax.distributed.initialize() if the run (`d`: config.distributed) is multi-process; returns
  whether JAX is distributed.

  Must run before anything touches the devices. Idempotent. On processes other than 0 the project's
  progress messages are turned down to warnings (process 0 speaks for the run).
  """
  check(d)
  if jax.distributed.is_initialized():
    return True
  if not wanted(d):
    return False
  s = settings(d)
  missing = [k for k, v in s.items() if v is None]
  if missing and detected_cluster() is None:
    raise ConfigError(
        f'A multi-process run needs {", ".join(missing)}: no cluster manager was detected to provide '
        f'{"it" if len(missing) == 1 else "them"}. Set --config.distributed.coordinator_address=HOST:PORT '
        '(process 0), --config.distributed.num_processes=N and --config.distributed.process_id=I on every '
        f'process (or the environment variables {", ".join(ENV.values())}); see docs/running.md.')
  try:
    jax.distributed.initialize(coordinator_address=s['coordinator_address'], num_processes=s['num_processes'],
                               process_id=s['process_id'])
  except (ValueError, TypeError) as e:
    raise ConfigError(f'jax.distributed.initialize() refused the settings {s}: {e}') from None
  if jax.process_index() != 0:
    logging.getLogger('autolora_jax').setLevel(logging.WARNING)
  log.info('Distributed run: process %d of %d, %d local / %d global devices', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


_BARRIERS = itertools.count()


def barrier(name: str, timeout_s: int = 3600) -> None:
  """Waits until every process gets here (no-op in a single-process run).

  A host-side barrier of the coordination service (no device collective, so it works while another
  process is still compiling).
  """
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top
    multihost.get_barrier_sync_fn()(key=f'autolora_{name.replace(" ", "_")}_{next(_BARRIERS)}',
                                    timeout_ms=timeout_s * 1000)


def compile_ahead(calls: Sequence[Tuple[Callable, tuple]]) -> None:
  """Multi-process: compiles each pmapped `fn` for `args` now, then waits for every process.

  The first run of a program with collectives must start on all processes within a short time (CPU
  collectives give up after 30 s); compiling can take longer than that on one host than on another. The
  compiled programs are cached, so the later calls do not compile again. No-op in a single process.
  """
  if jax.process_count() == 1:
    return
  start = time.time()
  for fn, args in calls:
    fn.lower(*args).compile()
  log.info('Compiled %d programs in %.0f s; waiting for the other processes', len(calls), time.time() - start)
  barrier('compiled')
