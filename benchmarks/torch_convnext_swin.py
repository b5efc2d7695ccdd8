"""PyTorch reference ConvNeXts and Swins with the LoRa branch of the benchmark (no timm): timm's
convnext_* and swin_*_patch4_window7_224 computations, LoRa on the dense layers as our models place it
(ConvNeXt: fc1, fc2; Swin: q, k, v, proj, fc1, fc2), `forward(x, branch)`, and inside: nearest resize to
input_size, clamp to [0, 1], ImageNet normalisation, as torch_reference's ResNet and ViT. Used by
benchmarks/step.py with torch_reference.AutoLoRaStep and eval_step (the head is 'head', as there);
`load_flax_convnext` and `load_flax_swin` copy our models' variables in, so that tests/test_benchmarks.py
can check that the reference computes our step."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_reference import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  LoRaLinear,
  load_flax_block,
  load_flax_dense,
  load_flax_head,
  load_flax_norm,
)

CONVNEXT_SIZES = {'convnext_t': ((3, 3, 9, 3), 96), 'convnext_s': ((3, 3, 27, 3), 96),
                  'convnext_b': ((3, 3, 27, 3), 128), 'convnext_l': ((3, 3, 27, 3), 192)}
SWIN_SIZES = {'swin_t': ((2, 2, 6, 2), 96, 3), 'swin_s': ((2, 2, 18, 2), 96, 3), 'swin_b': ((2, 2, 18, 2), 128, 4),
              'swin_l': ((2, 2, 18, 2), 192, 6)}


class _Input(nn.Module):

  def __init__(self, input_size):
    super().__init__()
    self.input_size = input_size
    self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

  def forward(self, x):
    if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
      x = F.interpolate(x, size=(self.input_size, self.input_size), mode='nearest')
    return (torch.clamp(x, 0.0, 1.0) - self.mean) / self.std


class LayerNorm2d(nn.LayerNorm):
  """timm's LayerNorm2d: over the channels of NCHW maps."""

  def forward(self, x):
    return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):

  def __init__(self, dim, rank, alpha):
    super().__init__()
    self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = LoRaLinear(dim, 4 * dim, 1, [0], rank, alpha)
    self.fc2 = LoRaLinear(4 * dim, dim, 1, [0], rank, alpha)
    self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

  def forward(self, x, branch):
    y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
    y = self.fc2(F.gelu(self.fc1(y, branch)), branch)
    return x + (y * self.gamma).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):

  def __init__(self, depths, dim, num_classes, lora_rank=8, lora_alpha=1.0, input_size=224, **unused):
    super().__init__()
    del unused
    dims = [dim * 2 ** i for i in range(4)]
    self.input = _Input(input_size)
    self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
    self.downsample = nn.ModuleList([nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                                   nn.Conv2d(dims[i - 1], dims[i], 2, 2)) for i in range(1, 4)])
    self.stages = nn.ModuleList([nn.ModuleList([ConvNeXtBlock(d, lora_rank, lora_alpha) for _ in range(n)])
                                 for d, n in zip(dims, depths)])
    self.head_norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.head = nn.Linear(dims[-1], num_classes)

  def forward(self, x, branch='adv'):
    x = self.stem(self.input(x))
    for i, blocks in enumerate(self.stages):
      if i > 0:
        x = self.downsample[i - 1](x)
      for block in blocks:
        x = block(x, branch)
    return self.head(self.head_norm(x.mean((2, 3))))


def _rel_index(w):
  coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing='ij')).flatten(1)
  rel = coords[:, :, None] - coords[:, None, :] + (w - 1)
  return rel[0] * (2 * w - 1) + rel[1]


def _mask(grid, w, s):
  img = torch.zeros(grid, grid)
  cnt = 0
  for h in (slice(0, -w), slice(-w, -s), slice(-s, None)):
    for v in (slice(0, -w), slice(-w, -s), slice(-s, None)):
      img[h, v] = cnt
      cnt += 1
  ids = img.view(grid // w, w, grid // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
  return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


class SwinBlock(nn.Module):
  """timm's block; the attention by F.scaled_dot_product_attention with the bias (and mask) as attn_mask."""

  def __init__(self, dim, heads, grid, window, shift, rank, alpha):
    super().__init__()
    self.heads, self.window = heads, min(grid, window)
    self.shift = 0 if grid <= window else shift
    self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
    self.qkv = LoRaLinear(dim, 3 * dim, 3, [0, 1, 2], rank, alpha)
    self.proj = LoRaLinear(dim, dim, 1, [0], rank, alpha)
    self.fc1 = LoRaLinear(dim, 4 * dim, 1, [0], rank, alpha)
    self.fc2 = LoRaLinear(4 * dim, dim, 1, [0], rank, alpha)
    self.table = nn.Parameter(torch.randn((2 * self.window - 1) ** 2, heads) * 0.02)
    self.register_buffer('index', _rel_index(self.window).reshape(-1))
    self.register_buffer('mask', _mask(grid, self.window, self.shift) if self.shift else None)

  def forward(self, x, branch):
    b, h, w, c = x.shape
    ws, s = self.window, self.shift
    y = self.norm1(x)
    if s:
      y = torch.roll(y, (-s, -s), (1, 2))
    win = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    n = ws * ws
    qkv = self.qkv(win, branch).reshape(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if self.mask is not None:
      nw = self.mask.shape[0]
      bias = (bias.unsqueeze(0) + self.mask.unsqueeze(1).unsqueeze(0)).expand(b, nw, self.heads, n, n)
      bias = bias.reshape(b * nw, self.heads, n, n)
    a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
    win = self.proj(a.transpose(1, 2).reshape(-1, n, c), branch)
    y = win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if s:
      y = torch.roll(y, (s, s), (1, 2))
    x = x + y
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x), branch)), branch)


class Swin(nn.Module):

  def __init__(self, depths, dim, heads, num_classes, lora_rank=8, lora_alpha=1.0, input_size=224, window=7,
               **unused):
    super().__init__()
    del unused
    self.input = _Input(input_size)
    self.patch_embed = nn.Conv2d(3, dim, 4, 4)
    self.patch_norm = nn.LayerNorm(dim)
    grid = input_size // 4
    self.merge_norm = nn.ModuleList([nn.LayerNorm(4 * dim * 2 ** i) for i in range(3)])
    self.merge = nn.ModuleList([nn.Linear(4 * dim * 2 ** i, 2 * dim * 2 ** i, bias=False) for i in range(3)])
    self.stages = nn.ModuleList([
        nn.ModuleList([SwinBlock(dim * 2 ** i, heads * 2 ** i, grid // 2 ** i, window, 0 if j % 2 == 0 else window // 2,
                                 lora_rank, lora_alpha) for j in range(n)]) for i, n in enumerate(depths)])
    self.norm = nn.LayerNorm(dim * 8)
    self.head = nn.Linear(dim * 8, num_classes)

  def forward(self, x, branch='adv'):
    x = self.patch_norm(self.patch_embed(self.input(x)).permute(0, 2, 3, 1))
    for i, blocks in enumerate(self.stages):
      if i > 0:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = self.merge[i - 1](self.merge_norm[i - 1](x))
      for block in blocks:
        x = block(x, branch)
    return self.head(self.norm(x).mean((1, 2)))


def _convnext(name):
  def build(num_classes, dim=0, depths=(), **kwargs):
    d, w = CONVNEXT_SIZES[name]
    return ConvNeXt(tuple(depths) or d, dim or w, num_classes, **kwargs)
  return build


def _swin(name):
  def build(num_classes, dim=0, depths=(), heads=0, window=0, **kwargs):
    d, w, h = SWIN_SIZES[name]
    return Swin(tuple(depths) or d, dim or w, heads or h, num_classes, window=window or 7, **kwargs)
  return build


ARCHITECTURES = {**{n: _convnext(n) for n in CONVNEXT_SIZES}, **{n: _swin(n) for n in SWIN_SIZES}}


def _t(a):
  return torch.from_numpy(np.array(a))


def _conv(dst: nn.Conv2d, src):
  dst.weight.data.copy_(_t(src['kernel']).permute(3, 2, 0, 1))  # HWIO -> OIHW (depthwise: I = 1)
  dst.bias.data.copy_(_t(src['bias']))


def load_flax_convnext(model: ConvNeXt, variables):
  """Copies Flax variables {'params'} of autolora_jax.models.ConvNeXt (patchify stem, LoRa on fc1 and fc2
  only, as this reference places it) into `model`; returns it."""
  params = variables['params']
  _conv(model.stem[0], params['stem_0'])
  load_flax_norm(model.stem[1], params['stem_1'])
  for i, blocks in enumerate(model.stages):
    p = params[f'stages_{i}']
    if i > 0:
      load_flax_norm(model.downsample[i - 1][0], p['downsample_0'])
      _conv(model.downsample[i - 1][1], p['downsample_1'])
    for j, block in enumerate(blocks):
      b = p[f'blocks_{j}']
      _conv(block.conv_dw, b['conv_dw'])
      load_flax_norm(block.norm, b['norm'])
      load_flax_dense(block.fc1, b['mlp']['fc1'])
      load_flax_dense(block.fc2, b['mlp']['fc2'])
      block.gamma.data.copy_(_t(b['gamma']))
  load_flax_norm(model.head_norm, params['head_norm'])
  load_flax_head(model.head, params['head'])
  return model


def load_flax_swin(model: Swin, variables):
  """Copies Flax variables {'params'} of autolora_jax.models.Swin into `model`; returns it. Where a stage's
  window is clamped to a smaller grid, ours indexes the central entries of the configured window's bias
  table and this reference holds a table of the clamped window's size: those entries are copied."""
  params = variables['params']
  _conv(model.patch_embed, params['patch_embed']['proj'])
  load_flax_norm(model.patch_norm, params['patch_embed']['norm'])
  for i, blocks in enumerate(model.stages):
    p = params[f'layers_{i}']
    if i > 0:
      load_flax_norm(model.merge_norm[i - 1], p['downsample']['norm'])
      model.merge[i - 1].weight.data.copy_(_t(p['downsample']['reduction']['kernel']).T)
    for j, block in enumerate(blocks):
      b = p[f'blocks_{j}']
      load_flax_block(block, b)
      table = np.asarray(b['attn']['relative_position_bias_table'])
      side, w = int(round(table.shape[0] ** 0.5)), block.window
      t = (side + 1) // 2
      table = table.reshape(side, side, -1)[t - w:t + w - 1, t - w:t + w - 1].reshape((2 * w - 1) ** 2, -1)
      block.table.data.copy_(_t(table))
  load_flax_norm(model.norm, params['norm'])
  load_flax_head(model.head, params['head'])
  return model
