"""Peak memory of a call on the CPU: the rise of the bytes malloc has handed out (glibc's mallinfo2; the
resident set elsewhere), sampled on a thread while the call runs.

  with memory.PeakMemory() as mem:
    call()
  mem.rise  # bytes
"""

import ctypes
import gc
import os
import threading
import time
from typing import Callable, Optional


class _MallInfo2(ctypes.Structure):
  _fields_ = [(name, ctypes.c_size_t) for name in
              ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks',
               'keepcost')]


def heap_in_use_fn() -> Optional[Callable[[], int]]:
  """Bytes malloc has handed out and not taken back (glibc's mallinfo2, all arenas); None elsewhere."""
  try:
    fn = ctypes.CDLL(None).mallinfo2
  except (OSError, AttributeError):
    return None
  fn.restype = _MallInfo2

  def in_use():
    info = fn()
    return int(info.uordblks + info.hblkhd)

  return in_use


def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def settled(read: Callable[[], int], interval: float = 0.05, timeout: float = 10.0) -> int:
  """read() once it has stopped falling: XLA's runtime frees a program's temporary buffers on its own
  threads after the call has returned, and a base read before that would hide the next call's memory."""
  gc.collect()
  last, deadline = read(), time.perf_counter() + timeout
  while time.perf_counter() < deadline:
    time.sleep(interval)
    now = read()
    if now >= last - (1 << 20):
      return now
    last = now
  return last


class PeakMemory:
  """The rise of the process's allocated memory over its settled value at entry, sampled every 5 ms.

  Counts the bytes malloc has handed out (glibc), so that memory freed earlier and kept for reuse
  (host.retain_freed_memory) does not hide an allocation; the resident set elsewhere.
  """

  def __enter__(self):
    self._read = heap_in_use_fn() or rss_bytes
    self.base = self.peak = settled(self._read)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.005):
      self.peak = max(self.peak, self._read())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._read())
    self.rise = self.peak - self.base
