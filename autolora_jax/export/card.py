"""The model card (README.md) of an export folder, from its model.json."""

from __future__ import annotations

from typing import Optional


def _pct(value) -> str:
  return '-' if value is None else f'{100 * float(value):.1f}%'


def model_card(card: dict, workdir: Optional[str] = None) -> str:
  """README.md text: what the model is, its numbers, how to load it and how to check it."""
  c, h, w = card['input_shape']
  test = card.get('test', {})
  aa = card.get('autoattack', {})
  tm = card['threat_model']
  arch = card['arch'] + ('' if card['stem'] == 'imagenet' else f' ({card["stem"]} stem)')
  if card.get('dim'):
    size = f'width {card["dim"]}, {card["depth"]} blocks, {card["heads"]} heads'
  else:
    size = f'width {card["width"]}'
  classes = card['classes']
  shown = ', '.join(str(k) for k in classes[:10]) + (' ...' if len(classes) > 10 else '')
  lines = [
      f'# {arch} robust on {card["dataset"]} ({card["method"]}, {tm["norm"]} eps {tm["eps"]:.4g})',
      '',
      f'A {arch} ({size}) fine-tuned with {card["method"]} by autolora-jax {card["package_version"]} to '
      f'resist {tm["norm"]} attacks of radius {tm["eps"]:.4g} (pixels in [0, 1]). This is the '
      f'{card["checkpoint"]} checkpoint (epoch {card["epoch"]}) of '
      + (f'the run in `{workdir}`.' if workdir else 'its run.'),
      '',
      f'- Input: float images (N, {c}, {h}, {w}) in [0, 1]; the model resizes them (nearest) to '
      f'{card["model_input_size"]} x {card["model_input_size"]}, clamps them to [0, 1] and normalises them '
      f'(mean {card["mean"]}, std {card["std"]}) inside.',
      f'- Output: logits over {card["num_classes"]} classes, in label order: {shown}.',
      '',
      '## Test accuracy',
      '',
      '| clean | PGD-10 | AutoAttack |',
      '|---|---|---|',
      f'| {_pct(test.get("clean"))} | {_pct(test.get("pgd10"))} | {_pct(test.get("autoattack"))} |',
      '',
  ]
  if aa:
    how = {'stratified': 'a class-stratified sample of', 'all': 'all'}.get(aa.get('points'), 'the first')
    lines += [f'Clean and PGD-10 on all {card.get("num_test")} test points; AutoAttack (version '
              f'{aa.get("version")}: {", ".join(aa.get("attacks", []))}) on {how} {aa.get("num_points")} '
              'of them, computed by autolora-jax\'s JAX AutoAttack.', '']
  lines += [
      '## Files',
      '',
      '- `model.pt`: TorchScript, images in [0, 1] to logits (preprocessing inside); needs only PyTorch.',
      f'- `model.safetensors`: the weights under PyTorch key names ({card["convert_arch"]}); no '
      'preprocessing, takes normalised inputs.',
      '- `model.json`: architecture, preprocessing, classes, threat model and numbers.',
      '',
      '## Load it in PyTorch',
      '',
      '```python',
      'import torch',
      "model = torch.jit.load('model.pt').eval()",
      f'logits = model(torch.rand(8, {c}, {h}, {w}))  # images in [0, 1]',
      '```',
      '',
      '## Load it back into autolora-jax',
      '',
      '```bash',
      f'autolora-convert --src=model.safetensors --arch={card["convert_arch"]} --dst=converted '
      + ('' if card['mean'] is None else f'--mean={",".join(str(v) for v in card["mean"])} '
         f'--std={",".join(str(v) for v in card["std"])}'),
      '```',
      '',
      '## Check it with the original AutoAttack',
      '',
      'With `pip install pyautoattack` (the original PyTorch AutoAttack) beside autolora-jax:',
      '',
      '```bash',
      f'autolora-export --workdir={workdir or "WORKDIR"} --checkpoint={card["checkpoint"]} --out=THIS_FOLDER '
      f'--check={aa.get("num_points", 1000) or 1000} --overwrite',
      '```',
      '',
      'It attacks `model.pt` with the original AutoAttack and the JAX model with autolora-jax\'s on the same '
      'test points (those the run\'s AutoAttack attacked), with the same attacks, norm and eps, and writes '
      'crosscheck.json.',
  ]
  check = card.get('crosscheck')
  if check:
    lines += ['', '## Cross-check', '', crosscheck_table(check)]
  return '\n'.join(lines) + '\n'


def crosscheck_table(check: dict) -> str:
  """A Markdown table of a crosscheck.json."""
  rows = ['| AutoAttack | robust accuracy | wall time |', '|---|---|---|']
  for name, label in (('ours', 'autolora-jax (JAX)'), ('original', 'original (PyTorch)')):
    r = check[name]
    rows.append(f'| {label} | {_pct(r["robust_accuracy"])} | {r["seconds"]:.1f} s |')
  rows.append('')
  rows.append(f'{check["points"]}, {check["norm"]} eps {check["eps"]:.4g}, attacks '
              f'{", ".join(check["attacks"])}; per-point agreement {check["agreement"]}/{check["num_points"]}'
              f' ({check["clean_agreement"]}/{check["num_points"]} before the attacks).')
  return '\n'.join(rows)
