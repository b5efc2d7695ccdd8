"""The original AutoAttack (PyTorch, `pip install pyautoattack`) on a model and points saved by
`benchmarks.autoattack_speed`: run it with the Python of a separate environment that has torch and
pyautoattack (this file imports neither JAX nor the project).

    /path/to/venv/bin/python benchmarks/autoattack_original.py IN.npz OUT.json

IN.npz holds the MLP's weights (w1, b1, w2, b2; logits = relu(x.flatten() @ w1 + b1) @ w2 + b2 on NHWC
images), the points x (N, H, W, C) and labels y, and the runs to time as a JSON list of
{"norm", "eps", "attack", "version"} in `runs`. OUT.json gets, per run, the robust accuracy and seconds.
"""

import json
import sys
import time

import numpy as np
import torch
from pyautoattack import AutoAttack


class MLP(torch.nn.Module):
  """The JAX benchmark's MLP on NCHW input (transposed back to NHWC before flattening)."""

  def __init__(self, w):
    super().__init__()
    self.w = [torch.tensor(w[k]) for k in ('w1', 'b1', 'w2', 'b2')]

  def forward(self, x):
    h = torch.relu(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) @ self.w[0] + self.w[1])
    return h @ self.w[2] + self.w[3]


def main(src: str, dst: str) -> None:
  data = np.load(src)
  torch.set_num_threads(int(data['threads']) if 'threads' in data else torch.get_num_threads())
  model = MLP(data).eval()
  x = torch.tensor(np.transpose(data['x'], (0, 3, 1, 2)))
  y = torch.tensor(data['y']).long()
  out = []
  for run in json.loads(str(data['runs'])):
    kw = dict(norm=run['norm'], eps=float(run['eps']), version=run['version'], seed=0)
    if run['version'] == 'custom':
      kw['attacks'] = [run['attack']]
    aa = AutoAttack(model, **kw)
    aa.verbose = False
    if run['version'] == 'custom':  # the standard version's settings for the one attack
      aa.apgd.n_restarts = 5 if run['norm'] == 'L1' else 1
      aa.apgd.use_largereps = aa.apgd_targeted.use_largereps = run['norm'] == 'L1'
      aa.apgd_targeted.n_target_classes = 5 if run['norm'] == 'L1' else 9
      aa.fab.n_target_classes = 9
    start = time.time()
    with torch.no_grad():
      adv = aa.run_standard_evaluation(x, y, batch_size=int(data['batch_size']))
      adv = adv[0] if isinstance(adv, tuple) else adv
    seconds = time.time() - start
    with torch.no_grad():
      robust = (model(adv).argmax(1) == y).numpy()
    out.append(dict(run, robust=float(robust.mean()), seconds=seconds, robust_points=robust.tolist()))
    print(json.dumps({k: v for k, v in out[-1].items() if k != 'robust_points'}), flush=True)
  with open(dst, 'w') as f:
    json.dump(out, f)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
