"""`autolora-export` / `python -m autolora_jax.export`: flags in, `export` (and `crosscheck`) out."""

from __future__ import annotations

import os

from absl import flags

from autolora_jax import cli

MODULE = 'autolora_jax.export'
USAGE = 'Pass --workdir=WORKDIR (a finished run) and --out=DIR; see docs/export.md.'

_FLAGS = {}


def define_flags() -> dict:
  """Defines the command's absl flags (once; not at import, so that importing this module claims none)."""
  if _FLAGS:
    return _FLAGS
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None, 'The workdir of a finished training run.')
  _FLAGS['checkpoint'] = flags.DEFINE_string('checkpoint', 'best',
                                             "'best' (by validation robust accuracy) or 'final'.")
  _FLAGS['out'] = flags.DEFINE_string('out', None, 'Folder to write model.safetensors, model.json, model.pt and '
                                      'README.md to; refused if it exists and is not empty, unless --overwrite.')
  _FLAGS['overwrite'] = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out folder.')
  _FLAGS['check'] = flags.DEFINE_integer('check', 0, 'Also attack N test points (chosen as the run\'s AutoAttack chooses them) with the original '
                                         'PyTorch AutoAttack (pip install pyautoattack) and with ours; writes '
                                         'crosscheck.json. 0: no check.')
  _FLAGS['check_batch_size'] = flags.DEFINE_integer('check_batch_size', 0, 'Batch size of both AutoAttacks in '
                                                    "the check (0: the run's config.autoattack.batch_size).")
  flags.mark_flags_as_required(['workdir', 'out'])
  return _FLAGS


def main(command: str) -> None:  # pylint: disable=unused-argument
  """Exports the run of --workdir into --out, and with --check=N cross-checks it."""
  from autolora_jax import api  # pylint: disable=g-import-not-at-top
  from autolora_jax import export as exporting  # pylint: disable=g-import-not-at-top
  f = {k: v.value for k, v in define_flags().items()}
  if f["check"] < 0:
    raise exporting.ExportError(f'--check={f["check"]}: give a number of test points (0: no check).')
  if f["checkpoint"] not in api.CHECKPOINTS:
    raise exporting.ExportError(f'--checkpoint={f["checkpoint"]!r}: choose one of {api.CHECKPOINTS}.')
  if f["check"]:
    from autolora_jax.export import crosscheck  # pylint: disable=g-import-not-at-top
    crosscheck.import_original()  # a missing package is told before the export
  card = exporting.export(f["workdir"], f["out"], checkpoint=f["checkpoint"],
                          overwrite=f["overwrite"])
  out = card['out']
  test = card.get('test', {})
  print(f'Exported the {card["checkpoint"]} checkpoint (epoch {card["epoch"]}) of {f["workdir"]} to {out}:\n'
        f'  {", ".join(exporting.FILES)}\n'
        f'  {card["arch"]} ({card["stem"]} stem), {card["num_classes"]} classes, input {card["input_shape"]}, '
        f'{card["threat_model"]["norm"]} eps {card["threat_model"]["eps"]:.4g}; test: '
        + ', '.join(f'{k} {100 * v:.1f}%' for k, v in test.items() if isinstance(v, float)))
  if f["check"]:
    from autolora_jax.export import card as cards  # pylint: disable=g-import-not-at-top
    run = api.load(f["workdir"], f["checkpoint"])
    report = crosscheck.crosscheck(run, os.path.join(out, 'model.pt'), f["check"], out=out,
                                   batch_size=f["check_batch_size"] or None)
    table = cards.crosscheck_table(report)
    card = exporting.check_card(out)
    with open(os.path.join(out, 'README.md'), 'w') as readme:
      readme.write(cards.model_card({**card, 'crosscheck': report}, workdir=run.workdir))
    print(f'\nCross-check with the original AutoAttack ({os.path.join(out, "crosscheck.json")}):\n{table}')


def run() -> None:
  """The console script `autolora-export` (and python -m autolora_jax.export)."""
  define_flags()
  cli.run_command(main, USAGE, MODULE)


if __name__ == '__main__':
  run()
