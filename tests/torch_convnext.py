"""PyTorch reference ConvNeXts with timm's `convnext_*` state-dict key names (timm itself is not needed), and
the ConvStem of Singh et al. in place of the stem, as their code sets `model.stem`.

Used by tests/test_convnext.py: random weights at a scale that keeps the activations of order one.
"""

import torch
from torch import nn

from tests.torch_vit import ChannelsFirstLayerNorm, randomize, robustbench_wrapped  # noqa: F401 (re-exported)


class Block(nn.Module):
  """timm's ConvNeXtBlock (conv_mlp=False): NCHW depthwise conv, then channels last LN, MLP, layer scale."""

  def __init__(self, dim):
    super().__init__()
    self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Sequential()
    self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
    self.gamma = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    y = self.conv_dw(x).permute(0, 2, 3, 1)
    y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
    return x + y * self.gamma.reshape(1, -1, 1, 1)


class Stage(nn.Module):

  def __init__(self, c_in, dim, depth):
    super().__init__()
    self.downsample = (nn.Sequential(ChannelsFirstLayerNorm(c_in), nn.Conv2d(c_in, dim, 2, 2)) if c_in != dim
                       else nn.Identity())
    self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])

  def forward(self, x):
    return self.blocks(self.downsample(x))


class ConvStem(nn.Module):
  """Singh et al.'s ConvBlock1 (T, S: 3x3/2 to dim / 2 and dim) or ConvBlock3 (B, L: dim / 2, 3 dim / 4, dim
  with strides 2, 2, 1), each convolution followed by a channels-first LayerNorm and GELU."""

  def __init__(self, dim, three):
    super().__init__()
    layers = ([(dim // 2, 2), (3 * dim // 4, 2), (dim, 1)] if three else [(dim // 2, 2), (dim, 2)])
    mods, c_in = [], 3
    for c, s in layers:
      mods += [nn.Conv2d(c_in, c, 3, s, 1), ChannelsFirstLayerNorm(c), nn.GELU()]
      c_in = c
    self.stem = nn.Sequential(*mods)

  def forward(self, x):
    return self.stem(x)


class Head(nn.Module):

  def __init__(self, dim, num_classes):
    super().__init__()
    self.norm = ChannelsFirstLayerNorm(dim)
    self.fc = nn.Linear(dim, num_classes)

  def forward(self, x):
    x = self.norm(x.mean((2, 3), keepdim=True))
    return self.fc(x.flatten(1))


class ConvNeXt(nn.Module):

  def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000, convstem=None):
    super().__init__()
    if convstem is None:
      self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0]))
    else:
      self.stem = ConvStem(dims[0], convstem == 'three')
    c_in, stages = dims[0], []
    for d, n in zip(dims, depths):
      stages.append(Stage(c_in, d, n))
      c_in = d
    self.stages = nn.Sequential(*stages)
    self.head = Head(dims[-1], num_classes)

  def forward(self, x):
    return self.head(self.stages(self.stem(x)))


def convnext(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000, convstem=None, seed=0):
  model = randomize(ConvNeXt(depths, dims, num_classes, convstem), seed)
  with torch.no_grad():  # layer scales of order 0.3: the residual branches matter, the activations stay small
    for name, p in model.named_parameters():
      if name.endswith('gamma'):
        p.copy_(0.3 * torch.rand(p.shape, generator=torch.Generator().manual_seed(seed)) + 0.1)
  return model.eval()

