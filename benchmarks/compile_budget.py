"""Where a cold run's time goes: every program XLA compiles during a whole training command, the code that
asked for it, and its tracing, lowering and compiling seconds, against the command's wall time.

    python -m benchmarks.compile_budget --config=configs/demo.py                  # the demo, cold (~4 min)
    python -m benchmarks.compile_budget --config=configs/demo.py --json=/tmp/budget.json

It runs `train_and_evaluate` (run.py's training mode: pre-training, fine-tuning, the test and AutoAttack)
in a new temporary workdir (or --workdir, which must be new or empty) with the persistent compilation cache
off, so every program compiles as on a user's first run. Each compilation is attributed to the two innermost
frames of this package on the Python stack that asked for it (e.g. `loop.py:train_epoch <
train.py:train`), and grouped by that place and the program's name (a pmapped step is named `_fun`: the
place says which). Programs that compile in under --small seconds, mostly the single operations run
outside jit (a model's initialisation, host-side bookkeeping), are summed in one line.

Output: the table (largest compile time first) and the totals; --json writes them.
"""

import collections
import json
import os
import shutil
import tempfile
import time
import traceback
from typing import Dict, List, Optional

from absl import flags

from autolora_jax import cli

MODULE = 'benchmarks.compile_budget'
USAGE = 'Pass --config=NAME or a config file (as run.py); see the module docstring.'

# jax.monitoring's events of one compilation, in the order they fire, and the field each one fills.
EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace_s',
          '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
          '/jax/core/compile/backend_compile_duration': 'compile_s'}
FIELDS = tuple(EVENTS.values())


def program_name(fun_name: str) -> str:
  """'jit(step)', 'pmap(step)' and 'step' are one program: 'step'."""
  for prefix in ('jit(', 'pmap('):
    if fun_name.startswith(prefix) and fun_name.endswith(')'):
      return fun_name[len(prefix):-1]
  return fun_name


class CompileRecorder:
  """A jax.monitoring listener (`jax.monitoring.register_event_duration_secs_listener(recorder)`) that
  records every tracing, lowering and XLA compilation with the place in the code under `root` that asked
  for it.

  Attributes:
    records: one dict per event: 'field' (one of FIELDS), 'name' (program_name), 'where' (the two innermost
      frames under `root`, innermost first, 'file.py:function < file.py:function'; '(outside)' if none),
      'seconds'.
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(root) + os.sep
    self.records: List[dict] = []

  def where(self) -> str:
    frames = [f for f in reversed(traceback.extract_stack()) if f.filename.startswith(self.root)]
    places = []
    for f in frames:
      place = f'{os.path.relpath(f.filename, self.root)}:{f.name}'
      if place not in places:
        places.append(place)
      if len(places) == 2:
        break
    return ' < '.join(places) or '(outside)'

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    field = EVENTS.get(event)
    if field is not None:
      self.records.append({'field': field, 'name': program_name(str(kwargs.get('fun_name', '?'))),
                           'where': self.where(), 'seconds': float(duration)})


def summarize(records: List[dict], small: float = 0.1) -> Dict[str, object]:
  """The records grouped by (name, where): 'programs' (one dict per group whose largest compile took at
  least `small` seconds: name, where, count (compilations), trace_s, lower_s, compile_s; largest compile_s
  first), 'small' (the same sums over the other groups, with 'groups'), and 'totals' (sums over all)."""
  groups = collections.OrderedDict()
  for r in records:
    g = groups.setdefault((r['name'], r['where']), {'name': r['name'], 'where': r['where'], 'count': 0,
                                                    'largest_compile_s': 0.0, **{f: 0.0 for f in FIELDS}})
    g[r['field']] += r['seconds']
    if r['field'] == 'compile_s':
      g['count'] += 1
      g['largest_compile_s'] = max(g['largest_compile_s'], r['seconds'])
  big = [g for g in groups.values() if g['largest_compile_s'] >= small]
  rest = [g for g in groups.values() if g['largest_compile_s'] < small]
  totals = {f: sum(g[f] for g in groups.values()) for f in FIELDS}
  totals['count'] = sum(g['count'] for g in groups.values())
  other = {f: sum(g[f] for g in rest) for f in FIELDS}
  other.update(count=sum(g['count'] for g in rest), groups=len(rest))
  big.sort(key=lambda g: -g['compile_s'])
  return {'programs': [{k: v for k, v in g.items() if k != 'largest_compile_s'} for g in big],
          'small': other, 'totals': totals}


def table(summary: dict, wall_s: Optional[float] = None, small: float = 0.1) -> str:
  """The summary as a text table; with `wall_s`, each total's share of it."""
  lines = [f'{"compile s":>9} {"trace s":>8} {"lower s":>8} {"count":>5}  program  (where)']
  for p in summary['programs']:
    lines.append(f'{p["compile_s"]:9.2f} {p["trace_s"]:8.2f} {p["lower_s"]:8.2f} {p["count"]:5d}  '
                 f'{p["name"]}  ({p["where"]})')
  s = summary['small']
  lines.append(f'{s["compile_s"]:9.2f} {s["trace_s"]:8.2f} {s["lower_s"]:8.2f} {s["count"]:5d}  '
               f'{s["groups"]} programs under {small:g} s each')
  t = summary['totals']
  lines.append(f'{t["compile_s"]:9.2f} {t["trace_s"]:8.2f} {t["lower_s"]:8.2f} {t["count"]:5d}  total')
  if wall_s:
    share = ', '.join(f'{f[:-2]} {100 * t[f] / wall_s:.0f}%' for f in FIELDS)
    lines.append(f'wall time {wall_s:.1f} s; of it {share}; the rest runs the programs, reads the data and '
                 'writes checkpoints')
  return '\n'.join(lines)


_FLAGS = {}


def define_flags() -> dict:
  if not _FLAGS:
    _FLAGS['config'] = cli.define_config_flag()
    _FLAGS['workdir'] = flags.DEFINE_string('workdir', '', 'A new or empty folder for the run; default: a '
                                            'temporary one, removed at the end.')
    _FLAGS['json'] = flags.DEFINE_string('json', '', 'Write the summary and the wall time here as JSON.')
    _FLAGS['small'] = flags.DEFINE_float('small', 0.1, 'Programs whose compilations all took less than this '
                                         '(seconds) are summed in one line.')
    flags.mark_flags_as_required(['config'])
  return _FLAGS


def main(command: str) -> None:
  del command
  import jax  # pylint: disable=g-import-not-at-top

  import autolora_jax  # pylint: disable=g-import-not-at-top
  from autolora_jax import errors, train  # pylint: disable=g-import-not-at-top
  values = define_flags()
  config, config_file = cli.load_config(values['config'])
  workdir = values['workdir'].value
  if workdir and os.path.isdir(workdir) and os.listdir(workdir):
    raise errors.WorkdirError(f'--workdir={workdir} is not empty: a run there would resume and compile less '
                             'than a first run. Pass a new or empty folder, or none (a temporary one).')
  temporary = not workdir
  workdir = workdir or tempfile.mkdtemp(prefix='compile_budget_')
  jax.config.update('jax_enable_compilation_cache', False)  # every program compiles, as on a first run
  recorder = CompileRecorder(os.path.dirname(autolora_jax.__file__))
  jax.monitoring.register_event_duration_secs_listener(recorder)
  start = time.perf_counter()
  try:
    train.train_and_evaluate(config, workdir)
  finally:
    wall_s = time.perf_counter() - start
    if temporary:
      shutil.rmtree(workdir, ignore_errors=True)
  small = values['small'].value
  summary = summarize(recorder.records, small)
  print(f'\nCompilations of {config_file} (cold: no compilation cache), {jax.devices()[0].device_kind}:')
  print(table(summary, wall_s, small))
  if values['json'].value:
    with open(values['json'].value, 'w') as f:
      json.dump({'config': config_file, 'wall_s': round(wall_s, 2), 'jax': jax.__version__,
                 'device': jax.devices()[0].device_kind, **summary}, f, indent=2)


if __name__ == '__main__':
  define_flags()
  cli.run_command(main, USAGE, MODULE)
