"""run.py config for the fault-tolerance tests: configs/demo.py made tiny (tiny_runs.tiny_config)."""

import tiny_runs


def get_config():
  return tiny_runs.tiny_config()
