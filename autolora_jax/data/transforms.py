"""docs/method.md's preprocessing, one example at a time, numpy and PIL (torchvision's rules, drawn from a numpy rng).

* CIFAR train: zero-pad 4, random 32x32 crop, horizontal flip with p = 0.5; test: none.
* Every other data set, train: resize the shorter side to 256 (bilinear, antialiased), random-resized crop
  to 224 (scale 0.08-1, aspect ratio 3/4-4/3, 10 tries then a centre crop), horizontal flip with p = 0.5;
  test: resize the shorter side to 256, centre crop 224.

Each function returns uint8 (H, W, 3); the caller scales to [0, 1]. The training transforms draw every random
number from the `rng` they are given, so the augmentation of an example is a function of that rng's seed.
"""

from __future__ import annotations

import io
import math
from typing import Tuple, Union

import numpy as np
from PIL import Image

RESIZE = 256
CROP = 224
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CIFAR_PAD = 4

Record = Union[bytes, str, np.ndarray]


def open_image(record: Record) -> Image.Image:
  """An RGB PIL image from encoded bytes, a file path or a uint8 array (grey and CMYK become RGB)."""
  if isinstance(record, np.ndarray):
    return Image.fromarray(record)
  image = Image.open(io.BytesIO(record) if isinstance(record, (bytes, bytearray)) else record)
  return image if image.mode == 'RGB' else image.convert('RGB')  # convert() of an RGB image is a copy


def resize_shorter(image: Image.Image, size: int = RESIZE) -> Image.Image:
  """torchvision Resize(size) for an int size: shorter side -> size, longer side int(size * long / short)."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return image
  return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: int = CROP) -> Image.Image:
  """torchvision CenterCrop(size): offsets int(round((side - size) / 2)); zero padding if smaller."""
  w, h = image.size
  if w < size or h < size:
    padded = Image.new('RGB', (max(w, size), max(h, size)))
    padded.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
    image, (w, h) = padded, padded.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=SCALE,
                            ratio=RATIO) -> Tuple[int, int, int, int]:
  """torchvision RandomResizedCrop.get_params: (top, left, crop_height, crop_width)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height  # fallback: the central crop with the ratio clamped into range
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def imagenet_train(record: Record, rng: np.random.Generator, size: int = CROP) -> np.ndarray:
  """Resize shorter side 256, random-resized crop `size`, horizontal flip: uint8 (size, size, 3)."""
  image = resize_shorter(open_image(record))
  top, left, h, w = random_resized_crop_box(image.size[0], image.size[1], rng)
  image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
  if rng.random() < 0.5:
    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # in C: no strided numpy copy
  return np.asarray(image, np.uint8)


def imagenet_eval(record: Record, size: int = CROP) -> np.ndarray:
  """Resize shorter side 256, centre crop `size`: uint8 (size, size, 3)."""
  return np.asarray(center_crop(resize_shorter(open_image(record)), size), np.uint8)


def _as_array(record: Record) -> np.ndarray:
  return record if isinstance(record, np.ndarray) else np.asarray(open_image(record), np.uint8)


def cifar_train(record: Record, rng: np.random.Generator) -> np.ndarray:
  """Zero-pad 4, random crop back to the input size, horizontal flip: uint8 (32, 32, 3) for CIFAR."""
  image = _as_array(record)
  h, w = image.shape[:2]
  padded = np.pad(image, ((CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD), (0, 0)))
  top = int(rng.integers(0, 2 * CIFAR_PAD + 1))
  left = int(rng.integers(0, 2 * CIFAR_PAD + 1))
  out = padded[top:top + h, left:left + w]
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def cifar_eval(record: Record) -> np.ndarray:
  """No test-time preprocessing for CIFAR."""
  return _as_array(record)
