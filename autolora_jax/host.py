"""Process-wide host settings that make the CPU side of a run faster.

XLA's CPU backend (and PyTorch's) allocates fresh buffers of tens to hundreds of MB for every step. glibc's
malloc serves allocations above its mmap threshold (at most 32 MB) with a new mmap and returns them to the
kernel when freed, so every step pays a page fault for every 4 KB page it writes. On virtual machines a
page fault is expensive: on this project's 2-core machines, filling a fresh 57 MB buffer took 70-90 ms
against 3 ms for a reused one, and the AutoLoRa train step of ResNet-18 at 32 x 32 ran 3.7x faster once
freed memory was kept for reuse (benchmarks/step.py). `retain_freed_memory` makes malloc keep it.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def retain_freed_memory() -> bool:
  """Makes glibc's malloc reuse freed memory instead of unmapping it (no mmap, no trimming of the heap).

  Freed memory stays in the process (its resident size stays at its peak) and is reused by the next
  allocations, which then need no page faults. Affects every later allocation of the process, XLA's and
  others'. Returns False where the C library is not glibc (nothing is changed there).
  """
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
  except (OSError, AttributeError):
    return False
  return ok
