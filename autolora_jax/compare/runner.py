"""Running a comparison's runs: each one is skipped when its results.json holds its test numbers, resumed
when it stopped part-way, started otherwise; every run's config and workdir are checked before the first
starts."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

from autolora_jax import config_checks, reporting
from autolora_jax import workdir as workdirs
from autolora_jax.compare.plan import Job, parse_methods, parse_seeds, parse_values, plan_comparison, plan_sweep
from autolora_jax.compare.summary import CHECKPOINTS, METRICS, format_seconds
from autolora_jax.errors import ConfigError, WorkdirError

log = logging.getLogger('autolora_jax.compare')

Runner = Callable[..., dict]  # train.train_and_evaluate(config, workdir) -> results


def read_results(workdir: str) -> Optional[dict]:
  """workdir/results.json, or None when it is missing or unreadable (a run stopped while writing it)."""
  path = os.path.join(workdir, reporting.RESULTS_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def is_finished(results: Optional[dict], autoattack: bool) -> bool:
  """Whether results.json holds the test numbers of the best and the final checkpoint: clean and PGD-10,
  and AutoAttack when the run has it enabled."""
  if not isinstance(results, dict):
    return False
  needed = ('clean', 'pgd10') + (('autoattack',) if autoattack else ())
  for name in CHECKPOINTS:
    test = (results.get(name) or {}).get('test') or {}
    if not all(isinstance(test.get(k), (int, float)) for k in needed):
      return False
  return True


def check_jobs(jobs: Sequence[Job]) -> None:
  """Checks every run before any starts: a valid config (config_checks.validate), and a workdir that is
  empty or holds a run of the same config (a finished run of another config would otherwise be skipped
  and its numbers reported as this config's). Raises ConfigError / WorkdirError."""
  for job in jobs:
    try:
      config_checks.validate(job.config)
    except ConfigError as e:
      raise ConfigError(f'The run {job.name} ({job.workdir}): {e}') from None
    path = os.path.join(job.workdir, workdirs.CONFIG_FILE)
    if not os.path.exists(path):
      continue
    try:
      differences = workdirs.config_differences(workdirs.read_config_file(path), workdirs.config_dict(job.config))
    except WorkdirError:  # written by a newer version
      raise
    except (OSError, ValueError) as e:
      differences = [f'{workdirs.CONFIG_FILE} cannot be read ({e})']
    if differences:
      more = len(differences) - 6
      shown = '; '.join(differences[:6]) + (f'; and {more} more' if more > 0 else '')
      raise WorkdirError(
          f'{job.workdir} holds a run of {job.name} with a different config ({shown}). The comparison would '
          'mix two settings: give this comparison another --workdir, or run it with the config that made '
          'that folder.')


def _short(results: dict) -> str:
  parts = []
  for name in CHECKPOINTS:
    test = (results.get(name) or {}).get('test') or {}
    nums = ' / '.join(f'{100 * test[k]:.2f}' for k in METRICS if isinstance(test.get(k), (int, float)))
    parts.append(f'{name} {nums}')
  return ', '.join(parts) + ' (SA / PGD-10' + (' / AA' if _has_aa(results) else '') + ', %)'


def _has_aa(results: dict) -> bool:
  return isinstance(((results.get('best') or {}).get('test') or {}).get('autoattack'), (int, float))


def execute(jobs: Sequence[Job], runner: Runner) -> Dict[Tuple[str, int], dict]:
  """Runs (or skips, or resumes) each job in order; returns {(group, seed): results}.

  A finished run is skipped and its results.json read; any other is handed to `runner(config, workdir)`
  (which resumes it). Results without 'wall_seconds' get this call's own timing. Logs one line per run.
  Exceptions of the runner (InputError, errors.Preempted) propagate: later runs do not start.
  """
  out: Dict[Tuple[str, int], dict] = {}
  total = len(jobs)
  for i, job in enumerate(jobs, start=1):
    where = f'[{i}/{total}] {job.name}'
    results = read_results(job.workdir)
    if is_finished(results, bool(job.config.autoattack.enabled)):
      wall = results.get('wall_seconds')
      log.info('%s: skipped (finished earlier): %s%s', where, _short(results),
               f', {format_seconds(wall)}' if isinstance(wall, (int, float)) else '')
    else:
      resuming = os.path.exists(os.path.join(job.workdir, 'checkpoints'))
      log.info('%s: %s in %s', where, 'resuming' if resuming else 'started', job.workdir)
      start = time.time()
      results = dict(runner(job.config, job.workdir))
      seconds = time.time() - start
      if not isinstance(results.get('wall_seconds'), (int, float)):
        results['wall_seconds'] = seconds
      log.info('%s: %s in %s: %s', where, 'resumed and finished' if resuming else 'finished',
               format_seconds(seconds), _short(results))
    out[(job.group, job.seed)] = results
  return out


def default_runner() -> Runner:
  """train.train_and_evaluate, imported when a run starts."""
  from autolora_jax import train  # pylint: disable=g-import-not-at-top (train builds models, data, ...)
  return train.train_and_evaluate


def group_results(done: Mapping[Tuple[str, int], dict], jobs: Sequence[Job]) -> Dict[str, Dict[int, dict]]:
  """{group: {seed: results}} of `jobs`, from `execute`'s {(group, seed): results}."""
  grouped: Dict[str, Dict[int, dict]] = {}
  for job in jobs:
    grouped.setdefault(job.group, {})[job.seed] = done[(job.group, job.seed)]
  return grouped


def run_all(config, method_names: Sequence[str], seeds: Sequence[int], workdir: str,
            runner: Optional[Runner] = None) -> Dict[str, Dict[int, dict]]:
  """Runs (or skips, or resumes) every (method, seed) in DIR/<method>/seed<k>; returns
  {method: {seed: results}}. Methods and seeds are checked, and every run's config and workdir, before
  any run starts."""
  method_names, seeds = parse_methods(method_names), parse_seeds(seeds)
  workdirs.check_writable(os.path.abspath(workdir))
  jobs = plan_comparison(config, method_names, seeds, workdir)
  check_jobs(jobs)
  return group_results(execute(jobs, runner or default_runner()), jobs)


def run_sweep(config, lrs: Sequence[float], l2s: Sequence[float], seeds: Sequence[int], workdir: str,
              runner: Optional[Runner] = None) -> Tuple[Dict[str, Dict[int, dict]], Dict[int, dict]]:
  """The sensitivity study: vanilla RFT over lrs x l2s and AutoLoRa (DIR/autolora/seed<k>, the
  comparison's runs), for `seeds`. Returns ({sweep label: {seed: results}}, {seed: AutoLoRa results})."""
  lrs, l2s = parse_values(lrs, 'sweep_lr'), parse_values(l2s, 'sweep_l2')
  seeds = parse_seeds(seeds)
  workdirs.check_writable(os.path.abspath(workdir))
  sweep_jobs = plan_sweep(config, lrs, l2s, seeds, workdir)
  autolora_jobs = plan_comparison(config, ['autolora'], seeds, workdir)
  check_jobs(sweep_jobs + autolora_jobs)
  done = execute(sweep_jobs + autolora_jobs, runner or default_runner())
  return group_results(done, sweep_jobs), group_results(done, autolora_jobs).get('autolora', {})
