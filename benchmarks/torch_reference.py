"""The AutoLoRa train step in PyTorch, written the way the authors' public code does it (for benchmarks).
Its ViT (timm's layout, LoRa on the dense layers, no code of the authors to follow) takes the same step.

This is the yardstick that benchmarks/step.py times against our JAX step on the same machine and inputs:

* a torchvision-layout ResNet-18/-50 (written here, torchvision is not needed) whose block convolutions
  carry the authors' LoRa branch: A (r*k, C_in*k) ~ N(0, 1), B (C_out*k, r*k) = 0, and on the natural
  branch the convolution uses W + reshape(B @ A, W.shape) * alpha / r;
* inside the model, as theirs: nearest resize to the model's input size, clamp to [0, 1], ImageNet
  normalisation;
* their PGD: `steps` sign-gradient steps of the mean cross-entropy of the adversarial branch in evaluation
  mode, a uniform random start, projection to the eps-ball and to [0, 1], then `model.train()`;
* then the natural forward with the feature extractor (conv weights, BN) frozen by switching requires_grad,
  the adversarial forward with the LoRa parameters frozen, one backward of
  l1 * CE_nat + (1 - l1) * CE_adv + l2 * KL(p_nat || p_adv) and SGD (momentum 0.9, weight decay 1e-4).

Images are NCHW float32 in [0, 1]. Nothing here is imported by the package; torch is optional.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LoRaConv2d(nn.Module):
  """A bias-free Conv2d whose weight may carry the LoRa branch of the authors' code (rank > 0)."""

  def __init__(self, c_in, c_out, k, stride=1, padding=0, rank=0, alpha=1.0):
    super().__init__()
    self.stride, self.padding, self.rank = stride, padding, rank
    self.weight = nn.Parameter(torch.empty(c_out, c_in, k, k))
    nn.init.kaiming_normal_(self.weight, mode='fan_out', nonlinearity='relu')
    if rank > 0:
      self.lora_A = nn.Parameter(torch.randn(rank * k, c_in * k))
      self.lora_B = nn.Parameter(torch.zeros(c_out * k, rank * k))
      self.scaling = alpha / rank

  def forward(self, x, branch='adv'):
    w = self.weight
    if self.rank > 0 and branch == 'nat':
      w = w + (self.lora_B @ self.lora_A).view(w.shape) * self.scaling
    return F.conv2d(x, w, None, self.stride, self.padding)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, c_in, planes, stride, rank, shortcut_rank, alpha):
    super().__init__()
    self.conv1 = LoRaConv2d(c_in, planes, 3, stride, 1, rank, alpha)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = LoRaConv2d(planes, planes, 3, 1, 1, rank, alpha)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or c_in != planes:
      self.downsample = nn.ModuleList([LoRaConv2d(c_in, planes, 1, stride, 0, shortcut_rank, alpha),
                                       nn.BatchNorm2d(planes)])

  def forward(self, x, branch):
    y = F.relu(self.bn1(self.conv1(x, branch)))
    y = self.bn2(self.conv2(y, branch))
    r = x if self.downsample is None else self.downsample[1](self.downsample[0](x, branch))
    return F.relu(y + r)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, c_in, planes, stride, rank, shortcut_rank, alpha):
    super().__init__()
    out = planes * 4
    self.conv1 = LoRaConv2d(c_in, planes, 1, 1, 0, rank, alpha)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = LoRaConv2d(planes, planes, 3, stride, 1, rank, alpha)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = LoRaConv2d(planes, out, 1, 1, 0, rank, alpha)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or c_in != out:
      self.downsample = nn.ModuleList([LoRaConv2d(c_in, out, 1, stride, 0, shortcut_rank, alpha),
                                       nn.BatchNorm2d(out)])

  def forward(self, x, branch):
    y = F.relu(self.bn1(self.conv1(x, branch)))
    y = F.relu(self.bn2(self.conv2(y, branch)))
    y = self.bn3(self.conv3(y, branch))
    r = x if self.downsample is None else self.downsample[1](self.downsample[0](x, branch))
    return F.relu(y + r)


class ResNet(nn.Module):
  """torchvision's ResNet with LoRa on the block convolutions; `forward(x, branch='adv'|'nat')`.

  Attributes mirror autolora_jax.models.ResNet: width (channels of the first stage), lora_rank,
  lora_alpha, lora_placement ('all' | 'last_block'), input_size, stem ('imagenet' | 'cifar').
  """

  def __init__(self, stage_sizes: Sequence[int], block: str, num_classes: int, width=64, lora_rank=8,
               lora_alpha=1.0, lora_placement='all', input_size=224, stem='imagenet'):
    super().__init__()
    self.input_size, self.stem = input_size, stem
    self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    if stem == 'imagenet':
      self.conv1 = LoRaConv2d(3, width, 7, 2, 3)
    else:
      self.conv1 = LoRaConv2d(3, width, 3, 1, 1)
    self.bn1 = nn.BatchNorm2d(width)
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[block]
    layers, c_in = [], width
    for i, n in enumerate(stage_sizes):
      for j in range(n):
        in_block = lora_placement == 'all' or j == n - 1
        on_shortcut = lora_placement == 'all'
        planes = width * 2**i
        layers.append(block_cls(c_in, planes, 2 if (i > 0 and j == 0) else 1,
                                lora_rank if in_block else 0, lora_rank if on_shortcut else 0, lora_alpha))
        c_in = planes * block_cls.expansion
    self.blocks = nn.ModuleList(layers)
    self.fc = nn.Linear(c_in, num_classes)

  def forward(self, x, branch='adv'):
    if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
      x = F.interpolate(x, size=(self.input_size, self.input_size), mode='nearest')
    x = (torch.clamp(x, 0.0, 1.0) - self.mean) / self.std
    x = F.relu(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = F.max_pool2d(x, 3, 2, 1)
    for block in self.blocks:
      x = block(x, branch)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet18(num_classes, **kwargs):
  return ResNet((2, 2, 2, 2), 'basic', num_classes, **kwargs)


def resnet50(num_classes, **kwargs):
  return ResNet((3, 4, 6, 3), 'bottleneck', num_classes, **kwargs)


class LoRaLinear(nn.Module):
  """nn.Linear whose output slices may carry the usual LoRA path on the natural branch:
  y = x W^T + b (+ (x A^T) B^T * alpha / r per slice), A (r, in) ~ N(0, 1), B (out, r) = 0."""

  def __init__(self, d_in, d_out, slices=1, lora_slices=(), rank=0, alpha=1.0):
    super().__init__()
    self.linear = nn.Linear(d_in, d_out)
    self.slices, self.scale = slices, alpha / max(rank, 1)
    self.lora_A = nn.ParameterDict({str(i): nn.Parameter(torch.randn(rank, d_in)) for i in lora_slices})
    self.lora_B = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(d_out // slices, rank)) for i in lora_slices})

  def forward(self, x, branch='adv'):
    y = self.linear(x)
    if branch != 'nat' or not len(self.lora_A):
      return y
    d = y.shape[-1] // self.slices
    parts = [(x @ self.lora_A[str(i)].T) @ self.lora_B[str(i)].T * self.scale if str(i) in self.lora_A
             else y.new_zeros(y.shape[:-1] + (d,)) for i in range(self.slices)]
    return y + torch.cat(parts, dim=-1)


class ViTBlock(nn.Module):
  """timm's pre-norm block with fused qkv and F.scaled_dot_product_attention (timm's fused_attn path)."""

  def __init__(self, dim, heads, rank, alpha, targets):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    qkv_lora = [i for i, t in enumerate(('q', 'k', 'v')) if t in targets]
    self.qkv = LoRaLinear(dim, 3 * dim, 3, qkv_lora, rank, alpha)
    self.proj = LoRaLinear(dim, dim, 1, [0] if 'proj' in targets else [], rank, alpha)
    self.fc1 = LoRaLinear(dim, 4 * dim, 1, [0] if 'fc1' in targets else [], rank, alpha)
    self.fc2 = LoRaLinear(4 * dim, dim, 1, [0] if 'fc2' in targets else [], rank, alpha)

  def forward(self, x, branch):
    b, n, c = x.shape
    qkv = self.qkv(self.norm1(x), branch).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(b, n, c)
    x = x + self.proj(y, branch)
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x), branch)), branch)


class ViT(nn.Module):
  """timm's vit_*_patch16_224 with LoRa on q, k, v, proj, fc1, fc2 (`lora_targets`); `forward(x, branch)`,
  inside: nearest resize to input_size, clamp to [0, 1], ImageNet normalisation, as for `ResNet`."""

  def __init__(self, dim, depth, heads, num_classes, lora_rank=8, lora_alpha=1.0, input_size=224,
               lora_targets=('q', 'k', 'v', 'proj', 'fc1', 'fc2'), **unused):
    super().__init__()
    del unused  # ResNet-only settings (width, stem)
    self.input_size, grid = input_size, input_size // 16
    self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    self.patch_embed = nn.Conv2d(3, dim, 16, 16)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.02)
    self.blocks = nn.ModuleList([ViTBlock(dim, heads, lora_rank, lora_alpha, lora_targets) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, x, branch='adv'):
    if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
      x = F.interpolate(x, size=(self.input_size, self.input_size), mode='nearest')
    x = (torch.clamp(x, 0.0, 1.0) - self.mean) / self.std
    x = self.patch_embed(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x, branch)
    return self.head(self.norm(x)[:, 0])


def vit_s16(num_classes, **kwargs):
  return ViT(384, 12, 6, num_classes, **kwargs)


def vit_b16(num_classes, **kwargs):
  return ViT(768, 12, 12, num_classes, **kwargs)


ARCHITECTURES = {'resnet18': resnet18, 'resnet50': resnet50, 'vit_s16': vit_s16, 'vit_b16': vit_b16}


def param_group(name: str) -> str:
  """'lora', 'head' or 'fe' for a parameter name of `ResNet` or `ViT`."""
  if 'lora_' in name:
    return 'lora'
  if name.startswith(('fc.', 'head.')):
    return 'head'
  return 'fe'


def set_trainable(model: nn.Module, **groups: bool):
  """requires_grad per group, e.g. set_trainable(model, fe=False, lora=True, head=True)."""
  for name, p in model.named_parameters():
    p.requires_grad_(groups[param_group(name)])


def pgd(model, x, y, *, eps, step_size, steps, random_start):
  """The public code's PGD: eval mode, mean CE of the adversarial branch, sign steps, projection, clamp."""
  model.eval()
  if random_start:
    x_adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0.0, 1.0)
  else:
    x_adv = x.clone()
  with torch.enable_grad():
    for _ in range(steps):
      x_adv.requires_grad_(True)
      loss = F.cross_entropy(model(x_adv, 'adv'), y)
      grad, = torch.autograd.grad(loss, x_adv, only_inputs=True)
      x_adv = x_adv.detach() + step_size * torch.sign(grad)
      x_adv = torch.clamp(torch.max(torch.min(x_adv, x + eps), x - eps), 0.0, 1.0)
  model.train()
  return x_adv.detach()


class AutoLoRaStep:
  """One AutoLoRa train step as the authors' public code runs it (see the module docstring)."""

  def __init__(self, model: nn.Module, *, lr=0.01, momentum=0.9, weight_decay=1e-4, eps=8 / 255,
               step_size=2 / 255, steps=10, l1=0.5, l2=3.0, kl_denominator: Optional[int] = None):
    self.model = model
    self.eps, self.step_size, self.steps = eps, step_size, steps
    self.l1, self.l2, self.kl_denominator = l1, l2, kl_denominator
    self.opt = torch.optim.SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)

  def __call__(self, x, y, random_start=True) -> Dict[str, float]:
    model = self.model
    model.train()
    x_adv = pgd(model, x, y, eps=self.eps, step_size=self.step_size, steps=self.steps,
                random_start=random_start)
    set_trainable(model, fe=False, lora=True, head=True)
    nat = model(x, 'nat')
    set_trainable(model, fe=True, lora=False, head=True)
    adv = model(x_adv, 'adv')
    n = self.kl_denominator or x.shape[0]
    kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(nat, dim=1), reduction='sum') / n
    loss = self.l1 * F.cross_entropy(nat, y) + (1 - self.l1) * F.cross_entropy(adv, y) + self.l2 * kl
    set_trainable(model, fe=True, lora=True, head=True)
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    return {'loss': float(loss.detach())}


@torch.no_grad()
def eval_step(model, x, y, *, eps=8 / 255, step_size=2 / 255, steps=10) -> Dict[str, int]:
  """The validation pass: clean accuracy of both branches and PGD accuracy (no random start), eval mode."""
  model.eval()
  counts = {'clean_adv': int((model(x, 'adv').argmax(1) == y).sum()),
            'clean_nat': int((model(x, 'nat').argmax(1) == y).sum())}
  x_adv = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, random_start=False)
  model.eval()
  counts['pgd'] = int((model(x_adv, 'adv').argmax(1) == y).sum())
  return counts


# ----------------------------------------------------------------------------------------------------------
# Loading our (Flax) variables, so that tests can check that both compute the same step
# ----------------------------------------------------------------------------------------------------------

def load_flax_variables(model: ResNet, variables, stage_sizes: Sequence[int]):
  """Copies Flax variables {'params', 'batch_stats'} of autolora_jax.models.ResNet into `model`."""
  params = variables['params']
  stats = variables['batch_stats']
  names = []
  for i, n in enumerate(stage_sizes):
    for j in range(n):
      names.append(f'layer{i + 1}_{j}')

  def conv(dst: LoRaConv2d, src):
    dst.weight.data.copy_(torch.from_numpy(np.array(src['kernel'])).permute(3, 2, 0, 1))
    if dst.rank > 0:
      dst.lora_A.data.copy_(torch.from_numpy(np.array(src['lora_A'])))
      dst.lora_B.data.copy_(torch.from_numpy(np.array(src['lora_B'])))

  def bn(dst: nn.BatchNorm2d, src, src_stats):
    dst.weight.data.copy_(torch.from_numpy(np.array(src['scale'])))
    dst.bias.data.copy_(torch.from_numpy(np.array(src['bias'])))
    dst.running_mean.copy_(torch.from_numpy(np.array(src_stats['mean'])))
    dst.running_var.copy_(torch.from_numpy(np.array(src_stats['var'])))

  conv(model.conv1, params['conv1'])
  bn(model.bn1, params['bn1'], stats['bn1'])
  for block, name in zip(model.blocks, names):
    p, s = params[name], stats[name]
    for conv_name in ('conv1', 'conv2', 'conv3'):
      if hasattr(block, conv_name):
        conv(getattr(block, conv_name), p[conv_name])
        bn_name = 'bn' + conv_name[-1]
        bn(getattr(block, bn_name), p[bn_name], s[bn_name])
    if block.downsample is not None:
      conv(block.downsample[0], p['downsample_conv'])
      bn(block.downsample[1], p['downsample_bn'], s['downsample_bn'])
  model.fc.weight.data.copy_(torch.from_numpy(np.array(params['head']['kernel'])).T)
  model.fc.bias.data.copy_(torch.from_numpy(np.array(params['head']['bias'])))
  return model


def load_flax_dense(dst: LoRaLinear, src, slices=('0',)):
  """Copies a Flax LoRaDense's parameters `src` into `dst`; `slices` names its output slices (('q', 'k',
  'v') for a fused qkv, whose LoRa factors sit under each slice's name)."""
  t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
  dst.linear.weight.data.copy_(t(src['kernel']).T)
  dst.linear.bias.data.copy_(t(src['bias']))
  for i, name in enumerate(slices):
    factors = src if len(slices) == 1 else src.get(name, {})
    if 'lora_A' in factors:
      dst.lora_A[str(i)].data.copy_(t(factors['lora_A']))
      dst.lora_B[str(i)].data.copy_(t(factors['lora_B']))


def load_flax_norm(dst: nn.LayerNorm, src):
  """Copies a Flax LayerNorm's scale and bias into `dst`."""
  dst.weight.data.copy_(torch.from_numpy(np.array(src['scale'])))
  dst.bias.data.copy_(torch.from_numpy(np.array(src['bias'])))


def load_flax_block(dst: nn.Module, src):
  """Copies a Flax pre-norm transformer block (norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2: our
  ViT's and Swin's) into `dst`, a reference block with the same attribute names."""
  load_flax_norm(dst.norm1, src['norm1'])
  load_flax_norm(dst.norm2, src['norm2'])
  load_flax_dense(dst.qkv, src['attn']['qkv'], ('q', 'k', 'v'))
  load_flax_dense(dst.proj, src['attn']['proj'])
  load_flax_dense(dst.fc1, src['mlp']['fc1'])
  load_flax_dense(dst.fc2, src['mlp']['fc2'])


def load_flax_head(dst: nn.Linear, src):
  """Copies a Flax Dense (kernel (in, out), bias) into `dst`."""
  dst.weight.data.copy_(torch.from_numpy(np.array(src['kernel'])).T)
  dst.bias.data.copy_(torch.from_numpy(np.array(src['bias'])))


def load_flax_vit(model: ViT, variables):
  """Copies Flax variables {'params'} of autolora_jax.models.ViT (patch embedding stem) into `model`."""
  params = variables['params']
  t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
  model.patch_embed.weight.data.copy_(t(params['patch_embed']['proj']['kernel']).permute(3, 2, 0, 1))
  model.patch_embed.bias.data.copy_(t(params['patch_embed']['proj']['bias']))
  model.cls_token.data.copy_(t(params['cls_token']))
  model.pos_embed.data.copy_(t(params['pos_embed']))
  for i, block in enumerate(model.blocks):
    load_flax_block(block, params[f'blocks_{i}'])
  load_flax_norm(model.norm, params['norm'])
  load_flax_head(model.head, params['head'])
  return model


def to_nchw(x: np.ndarray) -> torch.Tensor:
  """NHWC numpy images -> a contiguous NCHW float32 tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32))


def conv_flops(model: ResNet, input_size: int) -> float:
  """FLOPs (2 per multiply-add) of the convolutions and the head of one forward pass on one image."""
  total = 0.0

  def hook(module, inputs, output):
    nonlocal total
    if isinstance(module, LoRaConv2d):
      c_out, c_in, k, _ = module.weight.shape
      total += 2.0 * c_in * k * k * c_out * output.shape[-1] * output.shape[-2]
    elif isinstance(module, nn.Linear):
      total += 2.0 * module.in_features * module.out_features

  handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (LoRaConv2d, nn.Linear))]
  with torch.no_grad():
    model.eval()
    model(torch.zeros(1, 3, input_size, input_size))
  for h in handles:
    h.remove()
  return total

