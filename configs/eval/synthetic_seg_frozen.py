"""Evaluation: synthetic_seg task, frozen protocol (see fmjax/evaluate/tasks.py for every option)."""
from fmjax.evaluate.tasks import eval_config


def get_config(arg=None):
  return eval_config("synthetic_seg", "frozen", arg)
