"""Test set-up: the repository root on sys.path, quiet TensorFlow, float32 matmuls at full precision."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('PYTHONPATH', ROOT)
