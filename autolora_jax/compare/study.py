"""What autolora-compare does (`compare`): the comparison of methods over seeds and the sensitivity sweep,
every run checked before the first starts, and the outputs written into the workdir."""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from autolora_jax import reporting
from autolora_jax import workdir as workdirs
from autolora_jax.compare.plan import (
  DEFAULT_SEEDS,
  SWEEP_L2S,
  SWEEP_LR0S,
  SWEEP_LRS,
  SWEEP_METHOD,
  SWEEP_SEEDS,
  Job,
  default_methods,
  parse_methods,
  parse_seeds,
  parse_values,
  plan_comparison,
  plan_lr0_sweep,
  plan_sweep,
)
from autolora_jax.compare.plots import plot_comparison, plot_sensitivity
from autolora_jax.compare.runner import (
  Runner,
  check_jobs,
  default_runner,
  execute,
  group_results,
  is_finished,
  log,
  read_results,
)
from autolora_jax.compare.summary import (
  budget,
  describe_config,
  markdown,
  sensitivity_markdown,
  summarize,
  summarize_sweep,
)
from autolora_jax.errors import WorkdirError

COMPARISON_FILES = ('comparison.json', 'comparison.md', 'comparison.png')
SENSITIVITY_FILES = ('sensitivity.json', 'sensitivity.md', 'sensitivity.png')


def _write(names, data: dict, to_markdown, plot, workdir: str) -> List[str]:
  paths = [os.path.join(workdir, n) for n in names]
  reporting.atomic_write(paths[0], json.dumps(data, indent=2) + '\n')
  reporting.atomic_write(paths[1], to_markdown(data))
  plot(data, paths[2])
  return paths


def write_comparison(summary: dict, workdir: str) -> List[str]:
  """Writes comparison.json, comparison.md and comparison.png into `workdir`; returns their paths."""
  return _write(COMPARISON_FILES, summary, markdown, plot_comparison, workdir)


def write_sensitivity(sweep: dict, workdir: str) -> List[str]:
  """Writes sensitivity.json, sensitivity.md and sensitivity.png into `workdir`; returns their paths."""
  return _write(SENSITIVITY_FILES, sweep, sensitivity_markdown, plot_sensitivity, workdir)


def parse_lr0s(text_or_list) -> List[float]:
  """--sweep_lr0's values; '' or 'none': no AutoLoRa row."""
  if text_or_list is None or (isinstance(text_or_list, str) and text_or_list.strip().lower() in ('', 'none')):
    return []
  return parse_values(text_or_list, 'sweep_lr0')


def grid_search(job: Job, root: str) -> List[dict]:
  """The results of the sensitivity grid's finished runs in DIR/sweep/ for `job`'s seed when `job` runs the
  sweep's method (the search that chooses its lr), less a grid point with the job's own config (the job's run
  is then one of them); [] otherwise."""
  if job.group != SWEEP_METHOD:
    return []
  folder = os.path.join(root, 'sweep')
  own = workdirs.config_dict(job.config)
  out = []
  for label in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    workdir = os.path.join(folder, label, f'seed{job.seed}')
    results = read_results(workdir)
    try:
      with open(os.path.join(workdir, workdirs.CONFIG_FILE)) as f:
        config = json.load(f)
    except (OSError, ValueError):
      continue
    if config.get('method') != SWEEP_METHOD or not is_finished(results, bool(job.config.autoattack.enabled)):
      continue
    if not workdirs.config_differences(config, own):
      continue  # the comparison's own run, at a grid point
    out.append(results)
  return out


def compare(config, workdir: str, *, method_names: Optional[Sequence[str]] = None,
            seeds: Optional[Sequence[int]] = None, sweep: bool = False,
            sweep_lrs: Sequence[float] = SWEEP_LRS, sweep_l2s: Sequence[float] = SWEEP_L2S,
            sweep_lr0s: Sequence[float] = SWEEP_LR0S, config_file: str = '', command: str = '',
            runner: Optional[Runner] = None) -> dict:
  """What the command does: the comparison (when `method_names` is given, or without `sweep`) and the
  sweep (with `sweep`: vanilla RFT over sweep_lrs x sweep_l2s, AutoLoRa over its initial learning rate
  sweep_lr0s, [] for none), every run checked before the first starts; writes the outputs into `workdir`.

  Seeds default to DEFAULT_SEEDS for the comparison and SWEEP_SEEDS for a sweep alone. Returns
  {'comparison': summary or None, 'sensitivity': sweep summary or None}.
  """
  if method_names is None and not sweep:
    method_names = default_methods(config)
  method_names = parse_methods(method_names) if method_names is not None else None
  seeds = parse_seeds(seeds if seeds is not None else (DEFAULT_SEEDS if method_names else SWEEP_SEEDS))
  lrs, l2s = parse_values(sweep_lrs, 'sweep_lr'), parse_values(sweep_l2s, 'sweep_l2')
  lr0s = parse_lr0s(sweep_lr0s)
  root = os.path.abspath(os.path.expanduser(workdir or ''))
  if not workdir:
    raise WorkdirError('No workdir given: pass --workdir=DIR, the folder that holds every run and the '
                       'comparison.')
  workdirs.check_writable(root)
  compare_jobs = plan_comparison(config, method_names, seeds, root) if method_names else []
  sweep_jobs, autolora_jobs, lr0_all, lr0_jobs = [], [], [], []
  if sweep:
    sweep_jobs = plan_sweep(config, lrs, l2s, seeds, root)
    have = {(j.group, j.seed) for j in compare_jobs}
    autolora_jobs = [j for j in plan_comparison(config, ['autolora'], seeds, root)
                     if (j.group, j.seed) not in have]
    have |= {(j.group, j.seed) for j in autolora_jobs}
    lr0_all = plan_lr0_sweep(config, lr0s, seeds, root)  # config's own lr0: the autolora runs above
    lr0_jobs = [j for j in lr0_all if (j.group, j.seed) not in have]
  jobs = compare_jobs + sweep_jobs + autolora_jobs + lr0_jobs
  check_jobs(jobs)
  log.info('%d runs in %s: %s', len(jobs), root, ', '.join(j.name for j in jobs))
  done = execute(jobs, runner or default_runner())
  meta = describe_config(config, config_file, command)
  out = {'comparison': None, 'sensitivity': None}
  if compare_jobs:
    summary = {**meta, 'seeds': seeds, **summarize(group_results(done, compare_jobs))}
    for method, entry in summary['methods'].items():
      own = [j for j in compare_jobs if j.group == method]
      entry['budget'] = budget({j.seed: done[(j.group, j.seed)] for j in own},
                               {j.seed: grid_search(j, root) for j in own})
    paths = write_comparison(summary, root)
    out['comparison'] = summary
    log.info('Comparison written to %s', ', '.join(paths))
  if sweep:
    autolora = {s: r for (g, s), r in done.items() if g == 'autolora'}
    by_lr0 = {}
    for j in lr0_all:
      by_lr0.setdefault(j.lr0, {})[j.seed] = done[(j.group, j.seed)]
    summary = {**meta, 'seeds': seeds, **summarize_sweep(group_results(done, sweep_jobs), autolora, lrs, l2s,
                                                         by_lr0, lr0s)}
    paths = write_sensitivity(summary, root)
    out['sensitivity'] = summary
    log.info('Sensitivity study written to %s', ', '.join(paths))
  return out
