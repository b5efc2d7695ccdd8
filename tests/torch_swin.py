"""PyTorch reference Swin Transformers with timm's `swin_*_patch4_window7_224` state-dict key names (timm
itself is not needed): the current layout (patch merging at the start of layers 1-3, head.fc), written as
timm's code computes it (x0..x3 patch merging, the masked shifted windows, the relative position index).

Used by tests/test_swin.py: random weights at a scale that keeps the activations of order one.
"""

import torch
from torch import nn

from tests.torch_vit import randomize, robustbench_wrapped  # noqa: F401 (re-exported)


def window_partition(x, w):
  b, h, wd, c = x.shape
  x = x.view(b, h // w, w, wd // w, w, c)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, c)


def window_reverse(windows, w, h, wd):
  c = windows.shape[-1]
  x = windows.view(-1, h // w, wd // w, w, w, c)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, wd, c)


def relative_position_index(w):
  coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing='ij')).flatten(1)
  rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
  rel[:, :, 0] += w - 1
  rel[:, :, 1] += w - 1
  rel[:, :, 0] *= 2 * w - 1
  return rel.sum(-1)


class WindowAttention(nn.Module):

  def __init__(self, dim, heads, window):
    super().__init__()
    self.heads, self.window = heads, window
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
    self.register_buffer('relative_position_index', relative_position_index(window), persistent=False)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, mask=None):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
    attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
      nw = mask.shape[0]
      attn = (attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, n, n)
    return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, resolution, heads, window, shift):
    super().__init__()
    if resolution <= window:
      window, shift = resolution, 0
    self.window, self.shift = window, shift
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, heads, window)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, 4 * dim)
    mask = None
    if shift:
      img = torch.zeros((1, resolution, resolution, 1))
      cnt = 0
      for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
          img[:, h, w, :] = cnt
          cnt += 1
      mw = window_partition(img, window).view(-1, window * window)
      mask = mw.unsqueeze(1) - mw.unsqueeze(2)
      mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    self.register_buffer('attn_mask', mask, persistent=False)

  def forward(self, x):
    b, h, w, c = x.shape
    y = self.norm1(x)
    if self.shift:
      y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
    win = window_partition(y, self.window).view(-1, self.window * self.window, c)
    win = self.attn(win, self.attn_mask).view(-1, self.window, self.window, c)
    y = window_reverse(win, self.window, h, w)
    if self.shift:
      y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
    x = x + y
    return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.norm = nn.LayerNorm(4 * dim)
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

  def forward(self, x):
    x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
    x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
    return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))


class Stage(nn.Module):

  def __init__(self, dim, resolution, depth, heads, window, downsample):
    super().__init__()
    self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
    self.blocks = nn.Sequential(*[Block(dim, resolution, heads, window, 0 if j % 2 == 0 else window // 2)
                                  for j in range(depth)])

  def forward(self, x):
    return self.blocks(self.downsample(x))


class PatchEmbed(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, 4, 4)
    self.norm = nn.LayerNorm(dim)

  def forward(self, x):
    return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Head(nn.Module):

  def __init__(self, dim, num_classes):
    super().__init__()
    self.fc = nn.Linear(dim, num_classes)

  def forward(self, x):
    return self.fc(x.mean((1, 2)))


class SwinTransformer(nn.Module):

  def __init__(self, depths=(2, 2, 6, 2), dim=96, heads=3, window=7, img_size=224, num_classes=1000):
    super().__init__()
    self.patch_embed = PatchEmbed(dim)
    res = img_size // 4
    layers = []
    for i, d in enumerate(depths):
      layers.append(Stage(dim * 2 ** i, res // 2 ** i, d, heads * 2 ** i, window, i > 0))
    self.layers = nn.Sequential(*layers)
    self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
    self.head = Head(dim * 2 ** (len(depths) - 1), num_classes)

  def forward(self, x):
    return self.head(self.norm(self.layers(self.patch_embed(x))))


def swin(depths=(2, 2, 6, 2), dim=96, heads=3, window=7, img_size=224, num_classes=1000, seed=0):
  model = randomize(SwinTransformer(depths, dim, heads, window, img_size, num_classes), seed)
  with torch.no_grad():
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
      if name.endswith('relative_position_bias_table'):
        p.copy_(torch.randn(p.shape, generator=g))
  return model.eval()
