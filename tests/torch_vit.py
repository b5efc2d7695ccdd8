"""PyTorch reference ViTs with timm's state-dict key names (timm itself is not needed), and the ConvStem of
Singh et al. in place of the patch embedding's projection, as their code sets `patch_embed.proj`.

Used by tests/test_vit.py: random weights at a scale that keeps the activations of order one, saved in
the layouts autolora_jax.convert reads (plain timm, RobustBench's nn.Sequential(normalize, model),
DataParallel's 'module.' prefix).
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
  """timm's Attention (fused qkv, no q/k norm), without fused kernels."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ChannelsFirstLayerNorm(nn.Module):
  """Singh et al.'s LayerNorm(data_format='channels_first'): over the channels of NCHW maps, eps 1e-6."""

  def __init__(self, c, eps=1e-6):
    super().__init__()
    self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

  def forward(self, x):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class ConvStem(nn.Module):
  """Their ConvBlock(48, ...): four 3x3/2 convolutions 48-96-192-384 with LayerNorm and GELU, 1x1 to dim."""

  def __init__(self, dim, planes=48):
    super().__init__()
    layers, c_in = [], 3
    for c in (planes, 2 * planes, 4 * planes, 8 * planes):
      layers += [nn.Conv2d(c_in, c, 3, 2, 1), ChannelsFirstLayerNorm(c), nn.GELU()]
      c_in = c
    self.stem = nn.Sequential(*layers, nn.Conv2d(c_in, dim, 1, 1, 0))

  def forward(self, x):
    return self.stem(x)


class PatchEmbed(nn.Module):

  def __init__(self, dim, convstem=False):
    super().__init__()
    self.proj = ConvStem(dim) if convstem else nn.Conv2d(3, dim, 16, 16)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  """timm's VisionTransformer with token pooling; another input size resamples the position embedding
  as timm does (bicubic, antialiased, the class token's entry kept)."""

  def __init__(self, dim=384, depth=12, heads=6, num_classes=1000, img_size=224, convstem=False):
    super().__init__()
    grid = img_size // 16
    self.patch_embed = PatchEmbed(dim, convstem)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
    self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    pos = self.pos_embed
    if pos.shape[1] != x.shape[1] + 1:
      g0, g = int(round((pos.shape[1] - 1) ** 0.5)), int(round(x.shape[1] ** 0.5))
      grid = pos[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
      grid = F.interpolate(grid, size=(g, g), mode='bicubic', antialias=True, align_corners=False)
      pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], dim=1)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
    return self.head(self.norm(self.blocks(x))[:, 0])


def randomize(model: nn.Module, seed: int) -> nn.Module:
  """Random weights of a scale that keeps every activation of order one, and non-trivial LayerNorms."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('cls_token') or name.endswith('pos_embed'):
        p.copy_(0.5 * torch.randn(p.shape, generator=g))
      elif p.ndim >= 2:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
      elif name.endswith('weight'):  # LayerNorm scales
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return model


def vit(dim=384, depth=12, heads=6, num_classes=1000, convstem=False, seed=0):
  return randomize(VisionTransformer(dim, depth, heads, num_classes, convstem=convstem), seed).eval()


class ImageNormalizer(nn.Module):
  """RobustBench's normaliser: buffers mean and std of shape (1, 3, 1, 1)."""

  def __init__(self, mean, std):
    super().__init__()
    self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1))
    self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1))

  def forward(self, x):
    return (x - self.mean) / self.std


def robustbench_wrapped(model, mean, std) -> nn.Module:
  """RobustBench's and Singh et al.'s normalize_model: nn.Sequential(normalize=..., model=...)."""
  return nn.Sequential(OrderedDict([('normalize', ImageNormalizer(mean, std)), ('model', model)]))
