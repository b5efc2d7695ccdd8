"""The deployed model in PyTorch: the networks `export` writes as a TorchScript program.

`build(spec)` gives a `Deployed` module: NCHW float images in [0, 1] -> logits, with the JAX model's input
handling inside (PyTorch's legacy nearest resize to `input_size`, a clamp to [0, 1], the per-channel
normalisation), then the network under the key names of `convert.export_state_dict`:

* ResNet-18/50 in torchvision's layout (stem 'imagenet': 7x7/2 convolution and 3x3/2 max-pool) or the CIFAR
  layout (stem 'cifar': 3x3/1 convolution, projections 'shortcut.0/1', head 'linear');
* ViT-S/16 and ViT-B/16 in timm's layout (pre-norm blocks, fused qkv, exact GELU, LayerNorm eps 1e-6, the
  head on the class token), with the patch embedding or Singh et al.'s ConvStem (`patch_embed.proj.stem.K`);
* ConvNeXt-T/S/B/L in timm's layout, with the patchify stem or Singh et al.'s ConvStem (`stem.stem.K`);
* Swin-T/S/B/L in timm's current layout (patch merging at the start of layers 1-3, head.fc).

Every module is scriptable (`torch.jit.script`); nothing here imports JAX or the rest of the package.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

RESNET_BLOCKS = {'resnet18': ('basic', (2, 2, 2, 2)), 'resnet50': ('bottleneck', (3, 4, 6, 3))}
CONVSTEM_CHANNELS = (48, 96, 192, 384)
VIT_LAYER_NORM_EPS = 1e-6


def _projection(c_in: int, c_out: int, stride: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
  """torchvision's BasicBlock; the projection is named `downsample` (torchvision) or `shortcut` (CIFAR)."""
  expansion = 1

  def __init__(self, c_in: int, c: int, stride: int, shortcut_name: str):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    proj = _projection(c_in, c, stride) if (stride != 1 or c_in != c) else None
    self.downsample = proj if shortcut_name == 'downsample' else None
    self.shortcut = proj if shortcut_name == 'shortcut' else None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.downsample is not None:
      x = self.downsample(x)
    if self.shortcut is not None:
      x = self.shortcut(x)
    return F.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (the stride on the 3x3 convolution)."""
  expansion = 4

  def __init__(self, c_in: int, c: int, stride: int, shortcut_name: str):
    super().__init__()
    out = 4 * c
    self.conv1 = nn.Conv2d(c_in, c, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = nn.Conv2d(c, out, 1, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    proj = _projection(c_in, out, stride) if (stride != 1 or c_in != out) else None
    self.downsample = proj if shortcut_name == 'downsample' else None
    self.shortcut = proj if shortcut_name == 'shortcut' else None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.downsample is not None:
      x = self.downsample(x)
    if self.shortcut is not None:
      x = self.shortcut(x)
    return F.relu(y + x)


class ResNet(nn.Module):
  """torchvision's ResNet (stem 'imagenet') or the CIFAR layout (stem 'cifar'); takes normalised inputs."""

  def __init__(self, arch: str, num_classes: int, width: int, stem: str, in_channels: int = 3):
    super().__init__()
    kind, layers = RESNET_BLOCKS[arch]
    block = BasicBlock if kind == 'basic' else Bottleneck
    self.imagenet_stem = stem == 'imagenet'
    if self.imagenet_stem:
      self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    else:
      self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    shortcut = 'downsample' if self.imagenet_stem else 'shortcut'
    c_in = width
    for i, n in enumerate(layers):
      blocks = []
      for j in range(n):
        blocks.append(block(c_in, width * 2**i, 2 if (i > 0 and j == 0) else 1, shortcut))
        c_in = width * 2**i * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    head = nn.Linear(c_in, num_classes)
    self.fc = head if self.imagenet_stem else None
    self.linear = None if self.imagenet_stem else head

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.imagenet_stem:
      x = F.max_pool2d(x, 3, 2, 1)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.mean(x, dim=(2, 3))
    if self.fc is not None:
      return self.fc(x)
    assert self.linear is not None
    return self.linear(x)


class Attention(nn.Module):
  """timm's attention: fused qkv, softmax(q k^T / sqrt(head_dim)) v, output projection."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    hd = c // self.heads
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax(torch.matmul(q * (hd ** -0.5), k.transpose(-2, -1)), dim=-1)
    return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  """timm's pre-norm block."""

  def __init__(self, dim: int, heads: int, mlp_dim: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
    self.mlp = Mlp(dim, mlp_dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ChannelsFirstLayerNorm(nn.Module):
  """A LayerNorm over the channels of NCHW maps (the ConvStem's), eps 1e-6, biased variance."""

  def __init__(self, c: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(c))
    self.bias = nn.Parameter(torch.zeros(c))
    self.eps = VIT_LAYER_NORM_EPS

  def forward(self, x):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvStem(nn.Module):
  """Singh et al.'s ConvStem: [3x3/2 convolution, channels-first LayerNorm, GELU] x 4, a 1x1 convolution."""

  def __init__(self, dim: int, in_channels: int = 3, channels: Sequence[int] = CONVSTEM_CHANNELS):
    super().__init__()
    layers: List[nn.Module] = []
    c_in = in_channels
    for c in channels:
      layers += [nn.Conv2d(c_in, c, 3, 2, 1), ChannelsFirstLayerNorm(c), nn.GELU()]
      c_in = c
    layers.append(nn.Conv2d(c_in, dim, 1, 1, 0))
    self.stem = nn.Sequential(*layers)

  def forward(self, x):
    return self.stem(x)


class PatchEmbed(nn.Module):

  def __init__(self, dim: int, patch: int, stem: str, in_channels: int = 3):
    super().__init__()
    self.proj = ConvStem(dim, in_channels) if stem == 'convstem' else nn.Conv2d(in_channels, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
  """timm's VisionTransformer (class token, learned position embedding, no dropout); normalised inputs."""

  def __init__(self, num_classes: int, dim: int, depth: int, heads: int, grid: int, stem: str,
               patch: int = 16, mlp_ratio: int = 4, in_channels: int = 3):
    super().__init__()
    self.patch_embed = PatchEmbed(dim, patch, stem, in_channels)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
    self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio * dim) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, x):
    tokens = self.patch_embed(x)
    cls = self.cls_token.expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls, tokens], dim=1) + self.pos_embed
    x = self.norm(self.blocks(x))
    return self.head(x[:, 0])


class ConvNeXtBlock(nn.Module):
  """timm's ConvNeXtBlock: depthwise 7x7, channels-last LayerNorm and MLP, layer scale, residual."""

  def __init__(self, dim: int):
    super().__init__()
    self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
    self.norm = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
    self.mlp = Mlp(dim, 4 * dim)
    self.gamma = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    return x + y * self.gamma.reshape(1, -1, 1, 1)


class ConvNeXtStage(nn.Module):

  def __init__(self, c_in: int, dim: int, depth: int):
    super().__init__()
    self.downsample = (nn.Sequential(ChannelsFirstLayerNorm(c_in), nn.Conv2d(c_in, dim, 2, 2)) if c_in != dim
                       else nn.Identity())
    self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])

  def forward(self, x):
    return self.blocks(self.downsample(x))


class ConvNeXtStem(nn.Module):
  """Singh et al.'s ConvStem of a ConvNeXt: [3x3 convolution, channels-first LayerNorm, GELU] per layer."""

  def __init__(self, dim: int, layout: str, in_channels: int = 3):
    super().__init__()
    layers = [(dim // 2, 2), (dim, 2)] if layout == 'two' else [(dim // 2, 2), (3 * dim // 4, 2), (dim, 1)]
    mods: List[nn.Module] = []
    c_in = in_channels
    for c, stride in layers:
      mods += [nn.Conv2d(c_in, c, 3, stride, 1), ChannelsFirstLayerNorm(c), nn.GELU()]
      c_in = c
    self.stem = nn.Sequential(*mods)

  def forward(self, x):
    return self.stem(x)


class ConvNeXtHead(nn.Module):

  def __init__(self, dim: int, num_classes: int):
    super().__init__()
    self.norm = nn.LayerNorm(dim, eps=VIT_LAYER_NORM_EPS)
    self.fc = nn.Linear(dim, num_classes)

  def forward(self, x):
    return self.fc(self.norm(x.mean((2, 3))))


class ConvNeXt(nn.Module):
  """timm's ConvNeXt (no drop path), the patchify stem or the ConvStem; normalised inputs."""

  def __init__(self, num_classes: int, depths: Sequence[int], dims: Sequence[int], stem: str,
               convstem_layout: str = 'two', in_channels: int = 3):
    super().__init__()
    if stem == 'convstem':
      self.stem: nn.Module = ConvNeXtStem(dims[0], convstem_layout, in_channels)
    else:
      self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), ChannelsFirstLayerNorm(dims[0]))
    stages: List[nn.Module] = []
    c_in = dims[0]
    for d, n in zip(dims, depths):
      stages.append(ConvNeXtStage(c_in, d, n))
      c_in = d
    self.stages = nn.Sequential(*stages)
    self.head = ConvNeXtHead(dims[-1], num_classes)

  def forward(self, x):
    return self.head(self.stages(self.stem(x)))


def _relative_position_index(window: int, table_window: int) -> torch.Tensor:
  coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')).flatten(1)
  rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)
  return rel[0] * (2 * table_window - 1) + rel[1]


def _shift_mask(grid: int, window: int, shift: int) -> torch.Tensor:
  regions = torch.zeros(grid, grid)
  cuts = [(0, grid - window), (grid - window, grid - shift), (grid - shift, grid)]
  k = 0
  for h0, h1 in cuts:
    for w0, w1 in cuts:
      regions[h0:h1, w0:w1] = k
      k += 1
  ids = regions.view(grid // window, window, grid // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
  return (ids[:, None, :] != ids[:, :, None]).float() * -100.0


class WindowAttention(nn.Module):

  def __init__(self, dim: int, heads: int, window: int, table_window: int):
    super().__init__()
    self.heads = heads
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * table_window - 1) ** 2, heads))
    self.register_buffer('index', _relative_position_index(window, table_window).reshape(-1), persistent=False)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, mask: Optional[torch.Tensor]):
    b, n, c = x.shape
    hd = c // self.heads
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
    attn = torch.matmul(qkv[0] * (hd ** -0.5), qkv[1].transpose(-2, -1))
    attn = attn + self.relative_position_bias_table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
      nw = mask.shape[0]
      attn = (attn.view(b // nw, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(b, self.heads, n, n)
    y = torch.matmul(torch.softmax(attn, dim=-1), qkv[2])
    return self.proj(y.transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
  """timm's SwinTransformerBlock on (N, H, W, C), the window clamped to the grid as timm does."""

  def __init__(self, dim: int, heads: int, grid: int, window: int, shift: int):
    super().__init__()
    w = min(grid, window)
    self.window = w
    self.shift = 0 if grid <= window else shift
    self.norm1 = nn.LayerNorm(dim)
    self.attn = WindowAttention(dim, heads, w, window)
    self.norm2 = nn.LayerNorm(dim)
    self.mlp = Mlp(dim, 4 * dim)
    self.register_buffer('mask', _shift_mask(grid, w, self.shift) if self.shift else torch.zeros(0),
                         persistent=False)

  def forward(self, x):
    b, h, w, c = x.shape
    ws = self.window
    y = self.norm1(x)
    if self.shift > 0:
      y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
    win = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    win = self.attn(win, self.mask if self.shift > 0 else None)
    y = win.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    if self.shift > 0:
      y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
    x = x + y
    return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):

  def __init__(self, dim: int):
    super().__init__()
    self.norm = nn.LayerNorm(4 * dim)
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

  def forward(self, x):
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
    return self.reduction(self.norm(x))


class SwinStage(nn.Module):

  def __init__(self, dim: int, depth: int, heads: int, grid: int, window: int, downsample: bool):
    super().__init__()
    self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
    self.blocks = nn.Sequential(*[SwinBlock(dim, heads, grid, window, 0 if j % 2 == 0 else window // 2)
                                  for j in range(depth)])

  def forward(self, x):
    return self.blocks(self.downsample(x))


class SwinPatchEmbed(nn.Module):

  def __init__(self, dim: int, in_channels: int = 3):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, dim, 4, 4)
    self.norm = nn.LayerNorm(dim)

  def forward(self, x):
    return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinHead(nn.Module):

  def __init__(self, dim: int, num_classes: int):
    super().__init__()
    self.fc = nn.Linear(dim, num_classes)

  def forward(self, x):
    return self.fc(x.mean((1, 2)))


class Swin(nn.Module):
  """timm's SwinTransformer (current layout, no drop path) for `input_size` inputs; normalised inputs."""

  def __init__(self, num_classes: int, depths: Sequence[int], dim: int, heads: int, window: int, input_size: int,
               in_channels: int = 3):
    super().__init__()
    self.patch_embed = SwinPatchEmbed(dim, in_channels)
    grid = input_size // 4
    stages: List[nn.Module] = []
    for i, d in enumerate(depths):
      stages.append(SwinStage(dim * 2 ** i, d, heads * 2 ** i, grid // 2 ** i, window, i > 0))
    self.layers = nn.Sequential(*stages)
    width = dim * 2 ** (len(depths) - 1)
    self.norm = nn.LayerNorm(width)
    self.head = SwinHead(width, num_classes)

  def forward(self, x):
    return self.head(self.norm(self.layers(self.patch_embed(x))))


class Deployed(nn.Module):
  """Images in [0, 1] (N, C, H, W) -> logits: nearest resize, clamp, normalisation, then `net`."""

  def __init__(self, net: nn.Module, input_size: int, mean: Optional[Sequence[float]],
               std: Optional[Sequence[float]]):
    super().__init__()
    self.net = net
    self.input_size = int(input_size)
    self.normalize = mean is not None
    self.register_buffer('mean', torch.tensor(list(mean) if mean is not None else [0.0]).view(1, -1, 1, 1),
                         persistent=False)
    self.register_buffer('std', torch.tensor(list(std) if std is not None else [1.0]).view(1, -1, 1, 1),
                         persistent=False)

  def forward(self, x):
    if x.shape[2] != self.input_size or x.shape[3] != self.input_size:
      x = F.interpolate(x, size=[self.input_size, self.input_size], mode='nearest')
    x = torch.clamp(x, 0.0, 1.0)
    if self.normalize:
      x = (x - self.mean) / self.std
    return self.net(x)


def build(spec: dict) -> Deployed:
  """The deployed model `spec` (export's model.json: arch, stem, width, num_classes, in_channels,
  model_input_size, mean, std; a ViT's dim, depth, heads, patch_size, mlp_ratio; a ConvNeXt's depths, dims,
  convstem_layout; a Swin's depths, dim, heads, window) describes, with fresh weights."""
  arch, stem, c = spec['arch'], spec['stem'], int(spec.get('in_channels', 3))
  size = int(spec['model_input_size'])
  if arch in RESNET_BLOCKS:
    net: nn.Module = ResNet(arch, int(spec['num_classes']), int(spec['width']), stem, c)
  elif arch.startswith('convnext'):
    net = ConvNeXt(int(spec['num_classes']), [int(d) for d in spec['depths']], [int(d) for d in spec['dims']], stem,
                   str(spec.get('convstem_layout', 'two')), c)
  elif arch.startswith('swin'):
    net = Swin(int(spec['num_classes']), [int(d) for d in spec['depths']], int(spec['dim']), int(spec['heads']),
               int(spec['window']), size, c)
  else:
    patch = int(spec.get('patch_size', 16))
    net = ViT(int(spec['num_classes']), int(spec['dim']), int(spec['depth']), int(spec['heads']),
              size // patch, stem, patch=patch, mlp_ratio=int(spec.get('mlp_ratio', 4)), in_channels=c)
  return Deployed(net, size, spec.get('mean'), spec.get('std'))
