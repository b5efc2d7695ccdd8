"""Common corruptions (Hendrycks & Dietterich, ICLR 2019): robustness to distribution shift, as RobustBench's
CIFAR-10-C / CIFAR-100-C / ImageNet-C leaderboard measures it, beside the adversarial numbers.

* `corrupt(images, name, severity, seed=..., index=...)`: one of the 15 benchmark corruptions (`CORRUPTIONS`)
  at severity 1-5, seeded per image (`index`: the images' positions in the split, so any batching, process
  count or order gives the same images), keeping shape, dtype and range (uint8 -> uint8, float [0, 1] ->
  float [0, 1]). The parameters are CIFAR-10-C's (make_cifar_c.py) for images under `IMAGENET_MIN_SIDE`
  pixels a side (CIFAR, MNIST, the 8x8 digits) and ImageNet-C's (make_imagenet_c.py) for larger ones (the
  224 x 224 crops of the high-resolution data sets); `PARAMETERS`.
* `read_tfds(name, severity, data_dir)`: CIFAR-10-C itself from TFDS's `cifar10_corrupted` (configs
  '<corruption>_<severity>'), when it is prepared: the published images instead of regenerated ones.
* `evaluate(exp, results, name, state)`: what evaluation.test calls after each checkpoint's clean, PGD-10 and
  AutoAttack numbers: the clean accuracy of the deployed model (the adversarial branch, inference mode,
  `exp.p_eval_clean` through `loop.evaluate`, as the clean test number) on the corrupted test split, for
  each configured corruption and severity, into results[name]['test']['corruptions'] ({corruption:
  {severity: accuracy}}) and ['corruption_mean']; the settings and wall times into results['corruptions'];
  the heat map WORKDIR/corruptions.png (`plot_heatmap`, its matrix `heatmap_matrix`).

How faithful each corruption is (`FIDELITY`): every formula and parameter follows the original code; the
random numbers come from per-image numpy Generators, so the images are drawn from the same distributions as
CIFAR-10-C's, not bit-identical to them (use the TFDS path for the published CIFAR-10-C). Exact in
definition: gaussian_noise, shot_noise, impulse_noise (scikit-image's salt and pepper), defocus_blur (the
OpenCV disk kernel and border), glass_blur (including the original's one-way "swap", which copies the
neighbour's pixel), zoom_blur, fog (the diamond-square plasma), brightness (its HSV value shift, in closed
form), contrast, elastic_transform (OpenCV's bilinear affine warp as scipy's, which does not round sub-pixel
positions to 1/32 as OpenCV does), pixelate (PIL's box filter, in floating point), jpeg_compression (PIL). Re-implemented: motion_blur and snow's blurred snow layer use ImageMagick's motion
blur kernel and offsets in numpy (as bethgelab/imagecorruptions does; no ImageMagick/Wand). Synthesised:
frost blends procedurally drawn ice crystals (`frost_textures`) instead of the original's six frost photos,
which are not shipped: its numbers are not comparable with published frost numbers.
Uint8 results are rounded (make_cifar_c.py truncates: at most 1/255 apart).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import time
import weakref
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from autolora_jax import sampling

log = logging.getLogger(__name__)

CORRUPTIONS = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur',
               'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform', 'pixelate',
               'jpeg_compression')
SEVERITIES = (1, 2, 3, 4, 5)
SOURCES = ('auto', 'generate', 'tfds')  # config.eval.corruption_source
FIDELITY = {**{name: 'exact' for name in CORRUPTIONS}, 'motion_blur': 'reimplemented', 'snow': 'reimplemented',
            'frost': 'synthesised'}
MIN_SIDE = 8  # the smallest images the corruptions are defined for (the 8x8 digits)
IMAGENET_MIN_SIDE = 128  # images with both sides at least this large take ImageNet-C's parameters
HEATMAP_FILE = 'corruptions.png'
CACHE_BYTES = 1 << 30  # corrupted test batches kept between the best and the final checkpoint
# TFDS's cifar10_corrupted names two corruptions differently (its configs: '<name>_<severity>').
TFDS_NAMES = {'glass_blur': 'frosted_glass_blur', 'elastic_transform': 'elastic'}
TFDS_DATASET = 'cifar10_corrupted'
TFDS_FOR = {'cifar10': TFDS_DATASET}  # the data sets whose corrupted test split TFDS serves
FROST_SEED = 20190101  # the synthetic frost textures are fixed, as the original's photos are

_r = np.arange  # zoom_blur's factor lists, as the originals write them

# Severity parameters, 1-5, of CIFAR-10-C (hendrycks/robustness, make_cifar_c.py) and ImageNet-C
# (make_imagenet_c.py; TFDS's image_classification/corruptions.py holds the same).
PARAMETERS = {
    'cifar': {
        'gaussian_noise': [0.04, 0.06, .08, .09, .10],
        'shot_noise': [500, 250, 100, 75, 50],
        'impulse_noise': [.01, .02, .03, .05, .07],
        'defocus_blur': [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        'glass_blur': [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        'motion_blur': [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        'zoom_blur': [_r(1, 1.06, 0.01), _r(1, 1.11, 0.01), _r(1, 1.16, 0.01), _r(1, 1.21, 0.01),
                      _r(1, 1.26, 0.01)],
        'snow': [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                 (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                 (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        'frost': [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        'fog': [(.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)],
        'brightness': [.05, .1, .15, .2, .3],
        'contrast': [.75, .5, .4, .3, 0.15],
        # (alpha, sigma, affine) as fractions of the image side (make_cifar_c.py: IMSIZE * ...)
        'elastic_transform': [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                              (0.1, 0.03, 0.03)],
        'pixelate': [0.95, 0.9, 0.85, 0.75, 0.65],
        'jpeg_compression': [80, 65, 58, 50, 40],
    },
    'imagenet': {
        'gaussian_noise': [.08, .12, 0.18, 0.26, 0.38],
        'shot_noise': [60, 25, 12, 5, 3],
        'impulse_noise': [.03, .06, .09, 0.17, 0.27],
        'defocus_blur': [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        'glass_blur': [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        'motion_blur': [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
        'zoom_blur': [_r(1, 1.11, 0.01), _r(1, 1.16, 0.01), _r(1, 1.21, 0.02), _r(1, 1.26, 0.02),
                      _r(1, 1.31, 0.03)],
        'snow': [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
                 (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
        'frost': [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
        'fog': [(1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)],
        'brightness': [.1, .2, .3, .4, .5],
        'contrast': [.4, .3, .2, .1, .05],
        # make_imagenet_c.py's 244 * (...) at 224 pixels, as fractions of the side
        'elastic_transform': [(244 / 224 * 2, 244 / 224 * 0.7, 244 / 224 * 0.1),
                              (244 / 224 * 2, 244 / 224 * 0.08, 244 / 224 * 0.2),
                              (244 / 224 * 0.05, 244 / 224 * 0.01, 244 / 224 * 0.02),
                              (244 / 224 * 0.07, 244 / 224 * 0.01, 244 / 224 * 0.02),
                              (244 / 224 * 0.12, 244 / 224 * 0.01, 244 / 224 * 0.02)],
        'pixelate': [0.6, 0.5, 0.4, 0.3, 0.25],
        'jpeg_compression': [25, 18, 15, 10, 7],
    },
}
PARAMETER_NAMES = {'cifar': 'CIFAR-10-C', 'imagenet': 'ImageNet-C'}


def table_for(height: int, width: int) -> str:
  """'imagenet' (ImageNet-C's parameters) for images of at least IMAGENET_MIN_SIDE a side, else 'cifar'."""
  return 'imagenet' if min(height, width) >= IMAGENET_MIN_SIDE else 'cifar'


# -- helpers -------------------------------------------------------------------------------------------------

def _gray(x: np.ndarray) -> np.ndarray:
  """(n, H, W, 1) luma of (n, H, W, C) images (OpenCV's RGB2GRAY weights; grey images as they are)."""
  if x.shape[-1] == 3:
    return (x @ np.array([0.299, 0.587, 0.114]))[..., None]
  return x.mean(axis=-1, keepdims=True)


def _zoom_axis(x: np.ndarray, axis: int, n_out: int, start: int, size: int) -> np.ndarray:
  """scipy.ndimage.zoom(order=1) along one axis of x, to n_out samples (output o reads the input at
  o (n_in - 1) / (n_out - 1)), keeping outputs start .. start + size - 1."""
  n_in = x.shape[axis]
  coords = np.arange(start, start + size) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
  low = np.clip(np.floor(coords).astype(int), 0, max(n_in - 2, 0))
  high = np.minimum(low + 1, n_in - 1)
  frac = (coords - low).reshape((-1,) + (1,) * (x.ndim - axis - 1))
  return np.take(x, low, axis=axis) * (1 - frac) + np.take(x, high, axis=axis) * frac


def _clipped_zoom_batch(x: np.ndarray, zoom_factor: float) -> np.ndarray:
  """The originals' clipped_zoom of every image of (n, H, W, C): the centre ceil(H / z) x ceil(W / z) zoomed
  by z (bilinear, as scipy.ndimage.zoom(order=1)) and cropped back to H x W."""
  h, w = x.shape[1:3]
  ch, cw = int(np.ceil(h / float(zoom_factor))), int(np.ceil(w / float(zoom_factor)))
  top, left = (h - ch) // 2, (w - cw) // 2
  oh, ow = int(round(ch * zoom_factor)), int(round(cw * zoom_factor))  # scipy's output shape
  y = _zoom_axis(x[:, top:top + ch, left:left + cw], 1, oh, (oh - h) // 2, h)
  return _zoom_axis(y, 2, ow, (ow - w) // 2, w)


def plasma_fractal(rng: np.random.Generator, mapsize: int, wibbledecay: float) -> np.ndarray:
  """The originals' diamond-square height map (mapsize x mapsize, a power of two) in [0, 1]."""
  maparray = np.zeros((mapsize, mapsize))
  stepsize = mapsize
  wibble = 100.0

  def wibbledmean(array):
    return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

  while stepsize >= 2:
    corner = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
    square = corner + np.roll(corner, shift=-1, axis=0)
    square += np.roll(square, shift=-1, axis=1)
    maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = wibbledmean(square)
    dr = maparray[stepsize // 2:mapsize:stepsize, stepsize // 2:mapsize:stepsize]
    ul = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
    lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
    maparray[0:mapsize:stepsize, stepsize // 2:mapsize:stepsize] = wibbledmean(lt)
    tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
    maparray[stepsize // 2:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(tt)
    stepsize //= 2
    wibble /= wibbledecay
  maparray -= maparray.min()
  return maparray / maparray.max()


def _next_power_of_two(n: int) -> int:
  return 1 << max(1, int(n - 1).bit_length())


def motion_blur_image(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
  """ImageMagick's MotionBlurImage on (H, W[, C]): a one-sided Gaussian (width 2 ceil(radius) + 1) of the
  pixels at offsets (ceil(i cos a - 0.5), ceil(i sin a - 0.5)), i = 0, 1, ..., edge pixels beyond the border."""
  width = int(2 * math.ceil(radius) + 1)
  i = np.arange(width, dtype=np.float64)
  kernel = np.exp(-i ** 2 / (2 * sigma ** 2))
  kernel /= kernel.sum()
  a = np.deg2rad(angle)
  h, w = img.shape[:2]
  rows, cols = np.arange(h), np.arange(w)
  out = np.zeros(img.shape, np.float64)
  for k in range(width):
    ox, oy = math.ceil(k * math.cos(a) - 0.5), math.ceil(k * math.sin(a) - 0.5)
    out += kernel[k] * img[np.clip(rows + oy, 0, h - 1)][:, np.clip(cols + ox, 0, w - 1)]
  return out


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """The originals' defocus kernel: an aliased disk, normalised, blurred by OpenCV's GaussianBlur (3 or 5
  taps, reflect-101 border); cropped to its non-zero support (the same filter)."""
  if radius <= 8:
    span, ksize = np.arange(-8, 8 + 1), 3
  else:
    span, ksize = np.arange(-radius, radius + 1), 5
  xx, yy = np.meshgrid(span, span)
  disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  taps = np.arange(ksize) - (ksize - 1) / 2
  g = np.exp(-taps ** 2 / (2 * alias_blur ** 2))
  g /= g.sum()
  kernel = ndimage.correlate1d(ndimage.correlate1d(disk, g, axis=0, mode='mirror'), g, axis=1, mode='mirror')
  c = kernel.shape[0] // 2
  nonzero = np.argwhere(kernel > 0)
  r = int(np.abs(nonzero - c).max()) if len(nonzero) else 0
  return kernel[c - r:c + r + 1, c - r:c + r + 1]


def _correlate_hw(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """(n, H, W, C) correlated with a 2-D kernel over H, W, reflect-101 border (OpenCV's filter2D)."""
  if kernel.shape[0] <= 9:
    return ndimage.correlate(x, kernel[None, :, :, None], mode='mirror')
  from scipy import signal  # pylint: disable=g-import-not-at-top
  r = kernel.shape[0] // 2
  padded = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode='reflect')  # numpy's 'reflect' is reflect-101
  return signal.fftconvolve(padded, kernel[::-1, ::-1][None, :, :, None], mode='valid', axes=(1, 2))


def _gaussian_hw(x: np.ndarray, sigma: float, mode: str = 'nearest', truncate: float = 4.0) -> np.ndarray:
  """scikit-image's gaussian(x, sigma, channel_axis=-1) on (n, H, W, C): over H and W only."""
  return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode=mode, truncate=truncate)


# -- the corruptions: f(x (n, H, W, C) float64 in [0, 1], rngs (one per image), params) -> float64 ----------

def gaussian_noise(x, rngs, c):
  return x + np.stack([r.normal(size=x.shape[1:], scale=c) for r in rngs])


def shot_noise(x, rngs, c):
  return np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]) / float(c)


def impulse_noise(x, rngs, c):
  """scikit-image's random_noise(mode='s&p', amount=c): each value (per channel) replaced with probability c,
  by 1 or 0 with equal odds."""
  out = x.copy()
  for out_i, r in zip(out, rngs):
    flipped = r.random(out_i.shape) < c
    salted = r.random(out_i.shape) < 0.5
    out_i[flipped & salted] = 1.0
    out_i[flipped & ~salted] = 0.0
  return out


def defocus_blur(x, rngs, c):
  del rngs
  return _correlate_hw(x, disk_kernel(c[0], c[1]))


def glass_blur(x, rngs, c):
  """Blur, then local pixel shuffling, then blur again. As in the original, each "swap" copies the
  neighbour's pixel (`x[h, w], x[h', w'] = x[h', w'], x[h, w]` on numpy views assigns one way); the
  intermediate image is quantised to uint8 (truncated) as there."""
  sigma, delta, iterations = c
  n, h, w, _ = x.shape
  y = np.floor(np.clip(_gaussian_hw(x, sigma), 0, 1) * 255)
  positions = [(hh, ww) for hh in range(h - delta, delta, -1) for ww in range(w - delta, delta, -1)]
  if positions:
    draws = np.stack([r.integers(-delta, delta, size=(iterations, len(positions), 2)) for r in rngs])
    every = np.arange(n)
    for it in range(iterations):
      for k, (hh, ww) in enumerate(positions):
        dx, dy = draws[:, it, k, 0], draws[:, it, k, 1]
        y[every, hh, ww] = y[every, hh + dy, ww + dx]
  return _gaussian_hw(y / 255.0, sigma)


def motion_blur(x, rngs, c):
  radius, sigma = c
  return np.stack([motion_blur_image(xi, radius, sigma, r.uniform(-45, 45)) for r, xi in zip(rngs, x)])


def zoom_blur(x, rngs, c):
  del rngs
  out = np.zeros_like(x)
  for factor in c:
    out += _clipped_zoom_batch(x, factor)
  return (x + out) / (len(c) + 1)


def snow(x, rngs, c):
  """Snow flakes (a thresholded, zoomed noise layer, motion-blurred along a random angle in [-135, -45]
  degrees, added twice: as it is and rotated by 180 degrees) over a whitened image."""
  n, h, w, _ = x.shape
  layers = []
  for r in rngs:
    layer = r.normal(size=(h, w), loc=c[0], scale=c[1])
    layer = _clipped_zoom_batch(layer[None, :, :, None], c[2])[0, :, :, 0]
    layer[layer < c[3]] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255)  # an 8-bit grey image, as the original's PNG
    layer = motion_blur_image(layer, c[4], c[5], r.uniform(-135, -45)) / 255.0
    layers.append(layer[..., None])
  layer = np.stack(layers)
  x = c[6] * x + (1 - c[6]) * np.maximum(x, _gray(x) * 1.5 + 0.5)
  return x + layer + np.rot90(layer, k=2, axes=(1, 2))


@functools.lru_cache(maxsize=4)
def frost_textures(height: int, width: int, count: int = 5) -> Tuple[np.ndarray, ...]:
  """`count` synthetic frost images, (4 H, 4 W, 3) in [0, 1] (at least 64 a side), fixed (FROST_SEED).

  ImageNet-C's frost blends crops of six photos of frost on glass (five drawn) that are not shipped here;
  these stand in for them: about 200 dendritic ice crystals per image area (lines of 3-20% of the image side
  with side branches at +-60 degrees, drawn at twice the size and box-filtered for anti-aliasing) over a
  low-frequency haze, pale blue-white, mean about 0.4.
  """
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(FROST_SEED)
  th, tw = max(4 * height, 64), max(4 * width, 64)
  side = 2 * min(height, width)  # on the canvas, drawn at twice the size
  line = max(1, side // 64)
  textures = []
  for _ in range(count):
    canvas = Image.new('L', (2 * tw, 2 * th), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(200 * th * tw / (height * width))):
      x0, y0 = rng.uniform(0, 2 * tw), rng.uniform(0, 2 * th)
      angle = rng.uniform(0, 2 * np.pi)
      length = side * rng.uniform(0.03, 0.2)
      value = int(rng.uniform(60, 255))
      x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
      draw.line([(x0, y0), (x1, y1)], fill=value, width=line)
      for t in rng.uniform(0.15, 0.9, size=rng.integers(2, 6)):
        bx, by = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        for turn in (np.pi / 3, -np.pi / 3):
          b = length * (1 - t) * rng.uniform(0.2, 0.5)
          draw.line([(bx, by), (bx + b * np.cos(angle + turn), by + b * np.sin(angle + turn))],
                    fill=int(value * 0.8), width=line)
    crystals = np.asarray(canvas.resize((tw, th), Image.BOX), np.float64) / 255.0
    haze = plasma_fractal(rng, _next_power_of_two(max(th, tw)), 2.0)[:th, :tw]
    grey = np.clip(0.9 * crystals + 0.35 * haze, 0, 1)
    textures.append(np.clip(grey[..., None] * np.array([0.86, 0.93, 1.0]) + 0.04, 0, 1))
  return tuple(textures)


def frost(x, rngs, c):
  """x c[0] + a random crop of one of five frost images x c[1] (here synthetic: `frost_textures`)."""
  n, h, w, ch = x.shape
  textures = frost_textures(h, w)
  crops = []
  for r in rngs:
    t = textures[int(r.integers(len(textures)))]
    top, left = int(r.integers(0, t.shape[0] - h)), int(r.integers(0, t.shape[1] - w))
    crop = t[top:top + h, left:left + w]
    crops.append(crop if ch == 3 else _gray(crop[None])[0])
  return c[0] * x + c[1] * np.stack(crops)


def fog(x, rngs, c):
  n, h, w, _ = x.shape
  mapsize = _next_power_of_two(max(h, w))
  max_val = x.max(axis=(1, 2, 3), keepdims=True)
  haze = np.stack([plasma_fractal(r, mapsize, c[1])[:h, :w, None] for r in rngs])
  return (x + c[0] * haze) * max_val / (max_val + c[0])


def brightness(x, rngs, c):
  """HSV's value + c (clipped to 1), hue and saturation kept: the RGB values scale by V' / V (black turns
  grey V'), what scikit-image's rgb2hsv -> hsv2rgb round trip computes."""
  del rngs
  v = x.max(axis=-1, keepdims=True)
  v_new = np.minimum(v + c, 1.0)
  return np.where(v > 0, x * v_new / np.where(v > 0, v, 1.0), v_new)


def contrast(x, rngs, c):
  del rngs
  means = x.mean(axis=(1, 2), keepdims=True)
  return (x - means) * c + means


def _affine_matrix(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """OpenCV's getAffineTransform: the 2 x 3 map of three (x, y) points onto three others."""
  a = np.concatenate([src, np.ones((3, 1))], axis=1)
  return np.linalg.solve(a, dst).T


def elastic_transform(x, rngs, c):
  """A random affine warp (OpenCV's warpAffine, bilinear, reflect-101 border) then a smooth random
  displacement field (map_coordinates, bilinear, reflect)."""
  n, h, w, ch = x.shape
  side = min(h, w)
  alpha, sigma, affine = side * c[0], side * c[1], side * c[2]
  center = np.float32((h, w)) // 2  # (x, y) as the original writes them: equal for square images
  square = side // 3
  pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
  yy, xx, zz = np.meshgrid(np.arange(h), np.arange(w), np.arange(ch), indexing='ij')
  out = []
  for r, image in zip(rngs, x):
    pts2 = pts1 + r.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
    forward = np.vstack([_affine_matrix(pts1.astype(np.float64), pts2.astype(np.float64)), [0, 0, 1]])
    inv = np.linalg.inv(forward)  # warpAffine samples the source at M^-1 (x, y)
    matrix = np.array([[inv[1, 1], inv[1, 0], 0], [inv[0, 1], inv[0, 0], 0], [0, 0, 1]])
    warped = ndimage.affine_transform(image, matrix, offset=(inv[1, 2], inv[0, 2], 0), order=1, mode='mirror')
    dx = ndimage.gaussian_filter(r.uniform(-1, 1, size=(h, w)), sigma, mode='reflect', truncate=3) * alpha
    dy = ndimage.gaussian_filter(r.uniform(-1, 1, size=(h, w)), sigma, mode='reflect', truncate=3) * alpha
    coords = np.stack([yy + dy[..., None], xx + dx[..., None], zz])
    out.append(ndimage.map_coordinates(warped, coords, order=1, mode='reflect'))
  return np.stack(out)


def pixelate(x, rngs, c):
  """Box-filtered down to int(side * c) and back up (PIL's BOX), per channel in floating point."""
  del rngs
  from PIL import Image  # pylint: disable=g-import-not-at-top
  n, h, w, ch = x.shape
  small = (max(1, int(w * c)), max(1, int(h * c)))
  out = np.empty_like(x)
  for i in range(n):
    for k in range(ch):
      image = Image.fromarray(x[i, :, :, k].astype(np.float32), mode='F')
      out[i, :, :, k] = np.asarray(image.resize(small, Image.BOX).resize((w, h), Image.BOX))
  return out


def jpeg_compression(x, rngs, c):
  """JPEG at quality c (PIL, its default 4:2:0 chroma subsampling) and decoded back."""
  del rngs
  from PIL import Image  # pylint: disable=g-import-not-at-top
  u8 = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)
  out = []
  for image in u8:
    grey = image.shape[-1] == 1
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if grey else image).save(buffer, 'JPEG', quality=int(c))
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer), np.float64) / 255.0
    out.append(decoded[..., None] if grey else decoded)
  return np.stack(out)


FUNCTIONS = {name: globals()[name] for name in CORRUPTIONS}


def corrupt(images: np.ndarray, name: str, severity: int, *, seed: int = 0, index: Optional[Sequence[int]] = None,
            table: Optional[str] = None) -> np.ndarray:
  """`images` (n, H, W, C), uint8 or float in [0, 1], with corruption `name` at `severity` (1-5).

  Image i draws its random numbers from numpy's Generator seeded with (seed, corruption, severity,
  index[i]) (index: the images' positions in their split; default 0..n-1): the same images for the same
  seed, whatever the batching. Returns the same shape and dtype (uint8: rounded; float: clipped to [0, 1]).
  `table`: 'cifar' or 'imagenet' parameters (default: `table_for` the image size).
  """
  if name not in FUNCTIONS:
    raise ValueError(f'Unknown corruption {name!r}: choose from {CORRUPTIONS}.')
  if severity not in SEVERITIES:
    raise ValueError(f'Severity {severity!r} is outside 1-5.')
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'corrupt takes a batch (n, H, W, C), got shape {images.shape}.')
  n, h, w, _ = images.shape
  if min(h, w) < MIN_SIDE:
    raise ValueError(f'The corruptions need images of at least {MIN_SIDE} x {MIN_SIDE} pixels, got {h} x {w}.')
  if n == 0:
    return images.copy()
  index = np.arange(n) if index is None else np.asarray(index)
  if len(index) != n:
    raise ValueError(f'index has {len(index)} entries for {n} images.')
  is_uint8 = images.dtype == np.uint8
  x = images.astype(np.float64) / 255.0 if is_uint8 else np.clip(images.astype(np.float64), 0.0, 1.0)
  key = CORRUPTIONS.index(name)
  rngs = [np.random.default_rng([int(seed), key, int(severity), int(i)]) for i in index]
  params = PARAMETERS[table or table_for(h, w)][name][severity - 1]
  out = np.clip(FUNCTIONS[name](x, rngs, params), 0.0, 1.0)
  if is_uint8:
    return np.rint(out * 255.0).astype(np.uint8)
  return out.astype(images.dtype)


# -- settings and their checks ---------------------------------------------------------------------------------

class Settings(NamedTuple):
  """config.eval's corruption settings, resolved: the corruption names (in CORRUPTIONS' order), severities,
  seed, points (0: the whole test split), source ('auto', 'generate', 'tfds'), and the data set's name,
  data_dir and class selection (for TFDS's corrupted CIFAR-10)."""
  corruptions: Tuple[str, ...] = ()
  severities: Tuple[int, ...] = SEVERITIES
  seed: int = 0
  num_points: int = 0
  source: str = 'auto'
  dataset: str = ''
  data_dir: str = ''
  classes: Tuple[int, ...] = ()

  @property
  def enabled(self) -> bool:
    return bool(self.corruptions)


def _names(value) -> List[str]:
  """The listed names: a string or a sequence; commas split (--config.eval.corruptions=fog,snow gives
  ('fog,snow',)), brackets, quotes and spaces stripped."""
  items = [value] if isinstance(value, str) else list(value or ())
  out = []
  for item in items:
    for part in str(item).split(','):
      part = part.strip().strip('()[]\'" ')
      if part and part not in out:
        out.append(part)
  return out


def _eval_section(config) -> dict:
  section = config.get('eval') if hasattr(config, 'get') else None
  return dict(section) if section is not None else {}


def check_config(config) -> None:
  """ConfigError, before anything runs, for config.eval's corruption settings: unknown names, severities
  outside 1-5, a bad seed or point count, an unknown source, TFDS's CIFAR-10-C for another data set, and
  images too small are refused when the data is read (`settings` with the data: before training)."""
  from autolora_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  e = _eval_section(config)
  names = _names(e.get('corruptions', ()))
  unknown = [n for n in names if n not in CORRUPTIONS and n != 'all']
  if unknown:
    raise ConfigError(
        f'config.eval.corruptions names {", ".join(map(repr, unknown))}, which '
        f'{"is not a corruption" if len(unknown) == 1 else "are not corruptions"} of the common-corruptions '
        f'benchmark (CIFAR-10-C, ImageNet-C). Choose from {", ".join(CORRUPTIONS)}, or all of them: '
        "--config.eval.corruptions=all (several: --config.eval.corruptions=gaussian_noise,fog; in a config file "
        "a tuple, config.eval.corruptions = ('gaussian_noise', 'fog'); () turns the evaluation off).")
  if not names:
    return
  severities = e.get('severities', SEVERITIES)
  severities = (severities,) if isinstance(severities, int) else tuple(severities or ())
  if not severities or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s not in SEVERITIES
                           for s in severities):
    raise ConfigError(
        f'config.eval.severities={severities!r}: the common corruptions have the severities 1 (mildest) to 5 '
        '(strongest), as CIFAR-10-C and ImageNet-C define them; give a non-empty tuple of those, e.g. '
        '--config.eval.severities="(1,3,5)" (the default is all five).')
  for key in ('corruption_seed', 'corruption_points'):
    value = e.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      what = ('the seed of the corrupted images' if key == 'corruption_seed' else
              'N test points to corrupt (a class-stratified sample); 0 = the whole test split')
      raise ConfigError(f'config.eval.{key} must be an integer >= 0 ({what}), got {value!r}.')
  source = e.get('corruption_source', 'auto')
  if source not in SOURCES:
    raise ConfigError(f'config.eval.corruption_source={source!r} is not supported: choose one of {SOURCES} '
                      "('auto': TFDS's published CIFAR-10-C when the data set is cifar10 and it is prepared, "
                      "else the corruptions computed here; 'generate': always computed here; 'tfds': the "
                      'published images, an error if they are not prepared).')
  name = config.dataset.name
  if source == 'tfds' and name not in TFDS_FOR:
    raise ConfigError(
        f"config.eval.corruption_source='tfds' reads the published corrupted test images from TFDS, which "
        f'holds them for {", ".join(TFDS_FOR)} only (cifar10_corrupted: CIFAR-10-C), not for '
        f'config.dataset.name={name}. Use --config.eval.corruption_source=generate (or auto) to compute the '
        'corruptions of this data set\'s test split here.')
  # Every data set with a known image size has images of at least MIN_SIDE a side (the digits: 8 x 8);
  # folders are checked when they are read (`settings` with the data).


def _too_small(name: str, h: int, w: int):
  from autolora_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  return ConfigError(
      f'config.eval.corruptions cannot run on {name}: its test images are {h} x {w} pixels, and the '
      f'corruptions (blurs of several pixels, 8 x 8 JPEG blocks, pixelation, plasma fog) are defined for images '
      f'of at least {MIN_SIDE} x {MIN_SIDE}. Set --config.eval.corruptions="()" for this data set.')


def settings(config, data=None, global_batch: int = 0) -> Settings:
  """config.eval's corruption settings (`Settings`; disabled: Settings()). With `data` (the run's data set)
  and corruptions configured, its test images' size is checked (ConfigError when too small: folders, whose
  size is known once read), before anything trains."""
  e = _eval_section(config)
  names = _names(e.get('corruptions', ()))
  if not names:
    return Settings()
  names = list(CORRUPTIONS) if 'all' in names else [n for n in CORRUPTIONS if n in names]
  severities = e.get('severities', SEVERITIES)
  severities = (severities,) if isinstance(severities, int) else tuple(severities)
  d = config.dataset
  out = Settings(tuple(names), tuple(sorted({int(s) for s in severities})), int(e.get('corruption_seed', 0)),
                 int(e.get('corruption_points', 0)), str(e.get('corruption_source', 'auto')), str(d.name),
                 str(d.get('data_dir', '') or ''), tuple(int(c) for c in (d.get('classes', ()) or ())))
  if data is not None and data.num_examples('test'):
    h, w = image_shape(data, global_batch or 1)[:2]
    if min(h, w) < MIN_SIDE:
      raise _too_small(d.name, h, w)
  return out


def image_shape(data, global_batch: int) -> Tuple[int, int, int]:
  """(H, W, C) of a data set's test images as the evaluation gives them."""
  batch = next(iter(data.eval_batches('test', global_batch)))
  return tuple(int(v) for v in np.shape(batch['image'])[1:])


# -- TFDS: CIFAR-10-C as published -----------------------------------------------------------------------------

def tfds_config_name(name: str, severity: int) -> str:
  """TFDS's cifar10_corrupted config of a corruption and severity, e.g. 'frosted_glass_blur_3'."""
  return f'{TFDS_NAMES.get(name, name)}_{int(severity)}'


def read_tfds(name: str, severity: int, data_dir: str = '',
              dataset: str = TFDS_DATASET) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """The corrupted CIFAR-10 test split of TFDS's `dataset`/<name>_<severity> prepared in `data_dir` (''
  TFDS's default): (images uint8 (N, 32, 32, 3), labels int32 (N,)) in TFDS's order, or None when it is not
  prepared. DataError when TFDS cannot open or read it."""
  from autolora_jax.data import sources  # pylint: disable=g-import-not-at-top
  from autolora_jax.errors import DataError  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir) if data_dir else sources.default_data_dir()
  full = f'{dataset}/{tfds_config_name(name, severity)}'
  sources.hide_accelerators_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(full, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'TFDS could not open {full} ({type(e).__name__}: {str(e)[:200]}).') from None
  try:
    ds = builder.as_dataset(split='test', shuffle_files=False)
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(4096)):
      images.append(batch['image'])
      labels.append(batch['label'])
  except AssertionError:  # TFDS: "Dataset ...: could not find data in DIR"
    return None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'Reading {full} from {data_dir} failed ({type(e).__name__}: {str(e)[:300]}). The '
                    f'prepared files may be damaged: delete {os.path.join(data_dir, dataset)} and prepare it '
                    f'again with `{sources.prepare_command(full, data_dir)}`.') from None
  if not images:
    return np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)


def _not_prepared(name: str, severity: int, data_dir: str):
  from autolora_jax.data import sources  # pylint: disable=g-import-not-at-top
  from autolora_jax.errors import DataError  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir) if data_dir else sources.default_data_dir()
  full = f'{TFDS_DATASET}/{tfds_config_name(name, severity)}'
  return DataError(
      f"config.eval.corruption_source='tfds' reads CIFAR-10-C from TFDS, but {full} is not prepared in "
      f'{data_dir} (config.dataset.data_dir). Prepare it on a machine with internet access: '
      f'`{sources.prepare_command(full, data_dir)}` (one download, CIFAR-10-C.tar, 2.9 GB, for all '
      'corruptions), or use --config.eval.corruption_source=auto to compute the corruptions that are missing.')


# -- evaluation -------------------------------------------------------------------------------------------------

def _array_batches(images: np.ndarray, labels: np.ndarray, global_batch: int) -> Iterator[Dict[str, np.ndarray]]:
  """Masked evaluation batches (this process's rows) of in-memory test images, their dtype kept."""
  import jax  # pylint: disable=g-import-not-at-top

  from autolora_jax.data.core import process_rows  # pylint: disable=g-import-not-at-top
  rows = process_rows(global_batch, jax.process_index(), jax.process_count())
  n = len(labels)
  for start in range(0, n, global_batch):
    idx = np.arange(start, start + global_batch)
    valid = idx < n
    x = np.zeros((global_batch,) + images.shape[1:], images.dtype)
    x[valid] = images[idx[valid]]
    y = np.where(valid, labels[np.minimum(idx, n - 1)], 0).astype(np.int32)
    yield {'image': x[rows], 'label': y[rows], 'mask': valid.astype(np.float32)[rows],
           'index': np.arange(global_batch, dtype=np.int32)[rows]}


class CorruptionEvaluation:
  """The clean accuracy of checkpoints on the corrupted test split, for every configured corruption and
  severity; the corrupted batches are kept (up to CACHE_BYTES) for the next checkpoint."""

  def __init__(self, settings_: Settings, data, eval_batch_size: int, *, progress: bool = False):
    self.settings = settings_
    self.enabled = settings_.enabled
    self._data = data
    self._gb = int(eval_batch_size)
    self.progress = progress
    self.num_test = data.num_examples('test')
    n = settings_.num_points
    self.num_points = self.num_test if n == 0 else min(int(n), self.num_test)
    self.shape = image_shape(data, self._gb) if self.enabled and self.num_test else (0, 0, 0)
    self.table = table_for(*self.shape[:2]) if self.enabled else 'cifar'
    self.seconds: Dict[str, float] = {}
    self.corrupt_seconds = 0.0
    self.sources: Dict[str, List[str]] = {}
    self._cache: Dict[Tuple[str, int], list] = {}
    self._cache_bytes = 0
    self._indices = None

  # -- the corrupted batches --------------------------------------------------------------------------------

  def indices(self) -> np.ndarray:
    """The corrupted points' positions in the test split (all processes'): all of them, or a class-stratified
    sample of num_points (`sampling.sample_points`, seed eval.corruption_seed)."""
    if self._indices is None:
      self._indices = sampling.sample_points(self._data.labels('test'), self.num_points, self.settings.seed)
    return self._indices

  def _generated(self, name: str, severity: int):
    gb, seed = self._gb, self.settings.seed
    if self.num_points >= self.num_test:  # the whole split, batch by batch as the evaluation reads it
      for b, batch in enumerate(self._data.eval_batches('test', gb)):
        start = time.time()
        index = b * gb + batch['index']
        keep = batch['mask'] > 0
        image = np.array(batch['image'], copy=True)
        if keep.any():
          image[keep] = corrupt(image[keep], name, severity, seed=seed, index=index[keep], table=self.table)
        self.corrupt_seconds += time.time() - start
        yield {**batch, 'image': image}
      return
    images, labels, index = sampling.sample_of(self._data, 'test', self.indices())
    start = time.time()
    if len(index):
      images = corrupt(images, name, severity, seed=seed, index=index, table=self.table)
    self.corrupt_seconds += time.time() - start
    yield from sampling.point_batches(images, labels, len(self.indices()), gb)

  def _from_tfds(self, name: str, severity: int):
    """CIFAR-10-C's images from TFDS (source 'auto' or 'tfds' on cifar10), or None to generate them."""
    s = self.settings
    if s.source == 'generate' or s.dataset not in TFDS_FOR:
      return None
    got = read_tfds(name, severity, s.data_dir, TFDS_FOR[s.dataset])
    if got is None:
      if s.source == 'tfds':
        raise _not_prepared(name, severity, s.data_dir)
      log.info('%s/%s is not prepared: computing %s at severity %d.', TFDS_FOR[s.dataset],
               tfds_config_name(name, severity), name, severity)
      return None
    images, labels = got
    if s.classes:
      from autolora_jax.data.core import select_classes  # pylint: disable=g-import-not-at-top
      idx, labels = select_classes(labels, s.classes)
      images = images[idx]
    if self.num_points < self.num_test:  # CIFAR-10-C keeps CIFAR-10's test order: the same sampled points
      images, labels = images[self.indices()], labels[self.indices()]
    return _array_batches(images, labels, self._gb)

  def batches(self, name: str, severity: int):
    """The corrupted test batches (this process's rows, masked beyond num_points) of one corruption and
    severity: from the cache, TFDS, or corrupted here (in the caller's thread: the DeviceFeeder's)."""
    key = (name, int(severity))
    if key in self._cache:
      return iter(self._cache[key])
    tfds_batches = self._from_tfds(name, severity)
    source = f'tfds:{TFDS_FOR[self.settings.dataset]}' if tfds_batches is not None else 'generated'
    if source not in self.sources.setdefault(name, []):
      self.sources[name].append(source)
    return self._caching(key, tfds_batches if tfds_batches is not None else self._generated(name, severity))

  def _caching(self, key, batches):
    kept, size = [], 0
    for batch in batches:
      if kept is not None:
        size += sum(np.asarray(v).nbytes for v in batch.values())
        if self._cache_bytes + size <= CACHE_BYTES:
          kept.append(batch)
        else:
          kept = None
      yield batch
    if kept is not None:
      self._cache[key] = kept
      self._cache_bytes += size

  def clear(self) -> None:
    self._cache.clear()
    self._cache_bytes = 0

  # -- the numbers ------------------------------------------------------------------------------------------

  def accuracies(self, p_eval_clean, state, checkpoint: str = '') -> Dict[str, Dict[str, float]]:
    """{corruption: {str(severity): clean accuracy of the adversarial branch}} of a replicated state."""
    from autolora_jax import loop  # pylint: disable=g-import-not-at-top
    s = self.settings
    out: Dict[str, Dict[str, float]] = {}
    bar = loop.progress_bar(len(s.corruptions) * len(s.severities), f'corruptions ({checkpoint})', self.progress,
                            unit='set')
    try:
      for name in s.corruptions:
        out[name] = {}
        for severity in s.severities:
          acc = loop.evaluate(p_eval_clean, state, self.batches(name, severity), total=self.num_points,
                              global_batch=self._gb)
          out[name][str(severity)] = float(acc['clean_adv'])
          bar.update(1)
    finally:
      bar.close()
    return out

  def add(self, entry: dict, p_eval_clean, state, checkpoint: str) -> Optional[dict]:
    """entry['test']['corruptions'] and ['corruption_mean'] of a checkpoint; the wall time to `seconds`."""
    if not self.enabled:
      return None
    start = time.time()
    table = self.accuracies(p_eval_clean, state, checkpoint)
    self.seconds[checkpoint] = time.time() - start
    values = [v for by_severity in table.values() for v in by_severity.values()]
    entry['test']['corruptions'] = table
    entry['test']['corruption_mean'] = float(np.mean(values)) if values else float('nan')
    return table

  def summary(self) -> Dict[str, dict]:
    """The settings and times, for results.json's top level: {'corruptions': {...}} (empty when disabled)."""
    if not self.enabled:
      return {}
    s = self.settings
    sources = {name: '+'.join(self.sources.get(name, ['generated'])) for name in s.corruptions}
    fidelity = {name: ('published' if sources[name].startswith('tfds') else FIDELITY[name])
                for name in s.corruptions}
    return {'corruptions': {
        'corruptions': list(s.corruptions), 'severities': list(s.severities), 'seed': s.seed,
        'num_points': self.num_points, 'num_test': self.num_test, 'image_shape': list(self.shape),
        'parameters': PARAMETER_NAMES[self.table], 'source': sources, 'fidelity': fidelity,
        'metric': 'clean accuracy of the adversarial branch on the corrupted test points; corruption_mean: '
                  'the mean over corruptions and severities',
        'seconds': dict(self.seconds), 'corrupt_seconds': self.corrupt_seconds}}


# -- what evaluation.test calls -----------------------------------------------------------------------------------

_EVALUATIONS: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


def evaluate(exp, results: dict, checkpoint: str, state) -> Optional[dict]:
  """evaluation.test's corruption step for one checkpoint ('best' or 'final') of an Experiment: with
  config.eval.corruptions set (`exp.corruptions`), the corrupted test split's clean accuracy of the deployed
  model into results[checkpoint]['test'] ('corruptions', 'corruption_mean'), the settings and times into
  results['corruptions'], and (process 0) the heat map exp.workdir/corruptions.png of the checkpoints
  evaluated so far. Returns the checkpoint's {corruption: {severity: accuracy}}, or None when disabled."""
  s = getattr(exp, 'corruptions', None)
  if s is None or not s.enabled:
    return None
  ev = _EVALUATIONS.get(exp)
  if ev is None:
    ev = _EVALUATIONS[exp] = CorruptionEvaluation(s, exp.data, exp.eval_batch_size, progress=exp.progress)
  table = ev.add(results[checkpoint], exp.p_eval_clean, state, checkpoint)
  results.update(ev.summary())
  if checkpoint == 'final':
    ev.clear()  # the last checkpoint a test evaluates
  draw(exp, results)
  return table


def draw(exp, results: dict) -> None:
  """The heat map exp.workdir/corruptions.png of the checkpoints in `results` that have corruption numbers
  (process 0; nothing when none has)."""
  if not any('corruptions' in ((results.get(c) or {}).get('test') or {}) for c in ('best', 'final')):
    return
  if getattr(exp, 'is_chief', True) and getattr(exp, 'workdir', None):
    plot_heatmap(results, os.path.join(exp.workdir, HEATMAP_FILE))


# -- the heat map --------------------------------------------------------------------------------------------------

def heatmap_matrix(results: dict, checkpoint: str) -> Tuple[List[str], List[int], np.ndarray]:
  """(corruptions, severities, accuracies (len(corruptions), len(severities)), fractions, NaN where
  missing) of results[checkpoint]['test']['corruptions'], rows in CORRUPTIONS' order."""
  table = ((results.get(checkpoint) or {}).get('test') or {}).get('corruptions') or {}
  names = [n for n in CORRUPTIONS if n in table] + [n for n in table if n not in CORRUPTIONS]
  severities = sorted({int(s) for by_severity in table.values() for s in by_severity})
  matrix = np.full((len(names), len(severities)), np.nan)
  for i, name in enumerate(names):
    for j, severity in enumerate(severities):
      value = table[name].get(str(severity), table[name].get(severity))
      if isinstance(value, (int, float)):
        matrix[i, j] = float(value)
  return names, severities, matrix


def plot_heatmap(results: dict, path: str) -> Dict[str, np.ndarray]:
  """corruptions.png: per checkpoint with corruption numbers a panel of accuracy (percent) by corruption
  (rows) and severity (columns), annotated, the clean test accuracy and the mean in its title. Returns
  {checkpoint: the array drawn (percent)} (from the figure's images: what the file shows)."""
  from autolora_jax import reporting  # pylint: disable=g-import-not-at-top
  panels = [(name, heatmap_matrix(results, name)) for name, entry in results.items()
            if isinstance(entry, dict) and isinstance(entry.get('test'), dict) and entry['test'].get('corruptions')]
  if not panels:
    return {}
  plt = reporting.pyplot()
  rows = max(len(p[1][0]) for p in panels)
  fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.1 * max(len(p[1][1]) for p in panels) * len(panels),
                                                     1.2 + 0.38 * rows), squeeze=False)
  drawn = {}
  image = None
  for k, (ax, (checkpoint, (names, severities, matrix))) in enumerate(zip(axes[0], panels)):
    image = ax.imshow(100 * matrix, cmap='viridis', vmin=0, vmax=100, aspect='auto')
    drawn[checkpoint] = np.ma.filled(np.asarray(image.get_array(), dtype=np.float64), np.nan)
    for i in range(len(names)):
      for j in range(len(severities)):
        if np.isfinite(matrix[i, j]):
          ax.text(j, i, f'{100 * matrix[i, j]:.1f}', ha='center', va='center', fontsize=7,
                  color='white' if matrix[i, j] < 0.6 else 'black')
    ax.set_xticks(range(len(severities)), [str(s) for s in severities])
    ax.set_yticks(range(len(names)), names if k == 0 else [])  # the rows' names once, left of the panels
    entry = results[checkpoint]
    test = entry['test']
    clean = test.get('clean')
    mean = 100 * test.get('corruption_mean', np.nan)
    ax.set_title(f"{checkpoint} (epoch {entry.get('epoch', '?')}): mean {mean:.1f}%"
                 + (f', clean {100 * clean:.1f}%' if isinstance(clean, (int, float)) else ''), fontsize=9)
    ax.set_xlabel('severity')
  if image is not None:
    fig.colorbar(image, ax=list(axes[0]), label='accuracy (%)', shrink=0.8)
  settings_ = results.get('corruptions') or {}
  fig.suptitle(f"{results.get('dataset', '')}: clean accuracy under common corruptions "
               f"({settings_.get('parameters', '')} parameters, {settings_.get('num_points', '?')} test points)",
               fontsize=10)
  fig.savefig(path + '.tmp.png', dpi=100, bbox_inches='tight')
  plt.close(fig)
  os.replace(path + '.tmp.png', path)
  return drawn
