"""PyTorch reference ResNets with torchvision's state-dict key names (torchvision itself is not needed).

Used by the conversion tests: random weights, non-trivial BatchNorm statistics, saved in the layouts that
autolora_jax.convert reads (robustness library, plain, prefixed, CIFAR).
"""

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, c_in, c, stride, shortcut_name='downsample'):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    self.shortcut_name = shortcut_name
    proj = None
    if stride != 1 or c_in != c:
      proj = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
    setattr(self, shortcut_name, proj)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    proj = getattr(self, self.shortcut_name)
    return F.relu(y + (proj(x) if proj is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, c_in, c, stride, shortcut_name='downsample'):
    super().__init__()
    out = c * 4
    self.conv1 = nn.Conv2d(c_in, c, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = nn.Conv2d(c, out, 1, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = None
    if stride != 1 or c_in != out:
      self.downsample = nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False), nn.BatchNorm2d(out))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
  """torchvision's ResNet (stem='imagenet') or the common CIFAR ResNet (stem='cifar': 3x3/1 stem, no
  max-pool, 'shortcut' projections and a 'linear' head). Takes normalised inputs."""

  def __init__(self, block, layers, num_classes, width=64, stem='imagenet'):
    super().__init__()
    self.stem = stem
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    c_in = width
    shortcut = 'downsample' if stem == 'imagenet' else 'shortcut'
    for i, n in enumerate(layers):
      blocks = []
      for j in range(n):
        blocks.append(block(c_in, width * 2**i, 2 if (i > 0 and j == 0) else 1,
                            **({'shortcut_name': shortcut} if block is BasicBlock else {})))
        c_in = width * 2**i * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    head = nn.Linear(c_in, num_classes)
    setattr(self, 'fc' if stem == 'imagenet' else 'linear', head)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = F.max_pool2d(x, 3, 2, 1)
    for i in range(4):
      x = getattr(self, f'layer{i + 1}')(x)
    x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    return (self.fc if self.stem == 'imagenet' else self.linear)(x)


def randomize(model: nn.Module, seed: int) -> nn.Module:
  """Random conv/linear weights (torchvision-like scale) and non-trivial BN parameters and statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
        m.bias.copy_(0.2 * torch.randn(c, generator=g))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
        m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        m.num_batches_tracked.fill_(1000)
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    # As in trained ResNets, the last BatchNorm of each residual branch has small scales: the branches add
    # corrections to the identity path instead of compounding (train-mode BN over the 1x1 maps of a 32x32
    # input is otherwise so ill-conditioned that float32 itself differs from float64 by 1e-2).
    for m in model.modules():
      last = getattr(m, 'bn3', None) if isinstance(m, Bottleneck) else getattr(m, 'bn2', None)
      if isinstance(m, (BasicBlock, Bottleneck)):
        last.weight.copy_(0.1 + 0.2 * torch.rand(last.num_features, generator=g))
  return model


def resnet18(num_classes=1000, width=64, stem='imagenet', seed=0):
  return randomize(ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width, stem), seed).eval()


def resnet50(num_classes=1000, width=64, seed=0):
  return randomize(ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width), seed).eval()


class Normalized(nn.Module):
  """The robustness library's wrapper: a normaliser in front of the model, inputs in [0, 1]."""

  def __init__(self, model, mean, std):
    super().__init__()
    self.model = model
    self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1))
    self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1))

  def forward(self, x):
    return self.model((x - self.mean) / self.std)


def save_robustness(model, path, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """torch.save in the robustness library's layout: module.model.*, module.attacker.model.* (the same
  weights), module.normalizer.new_mean/new_std (and the attacker's normaliser), under 'model'."""
  sd = {}
  for prefix in ('module.model.', 'module.attacker.model.'):
    sd.update({prefix + k: v.clone() for k, v in model.state_dict().items()})
  for prefix in ('module.normalizer.', 'module.attacker.normalizer.'):
    sd[prefix + 'new_mean'] = torch.tensor(mean).view(3, 1, 1)
    sd[prefix + 'new_std'] = torch.tensor(std).view(3, 1, 1)
  torch.save({'model': sd, 'epoch': 90, 'optimizer': {'state': {}, 'param_groups': []}}, path)


def save_plain(model, path, prefix='', under=None):
  """torch.save of the bare state dict (optionally prefixed, optionally under a key)."""
  sd = {prefix + k: v for k, v in model.state_dict().items()}
  torch.save(sd if under is None else {under: sd}, path)
