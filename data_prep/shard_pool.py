"""Runs a converter's shard tasks in worker processes behind one progress bar (spectral_earth,
ssl4eo_s12): `run(tasks, convert_shard, ...)`, with `convert_shard` calling `report(count, bytes)`
after each location it writes."""
from __future__ import annotations

import multiprocessing
import queue
import time

import tqdm

_progress = None  # where report() sends (count, bytes): the pool's queue in a worker, a local queue in-process


def _init_worker(progress_queue):
  global _progress
  _progress = progress_queue


def report(count: int, nbytes: int) -> None:
  if _progress is not None:
    _progress.put((count, nbytes))


def run(tasks, convert_shard, workers: int, progress: bool, total: int, unit: str) -> list:
  """[convert_shard(task) for task in tasks], on min(workers, len(tasks)) spawned processes when
  workers > 1; the bar counts `total` `unit`s as the workers report them."""
  global _progress
  bar = tqdm.tqdm(total=total, unit=unit, desc="converting", disable=not progress or not tasks)
  start, nbytes = time.perf_counter(), 0

  def advance(count, size):
    nonlocal nbytes
    nbytes += size
    bar.update(count)
    bar.set_postfix_str(f"{nbytes / 1e6 / max(1e-9, time.perf_counter() - start):.0f} MB/s", refresh=False)

  if workers == 1 or len(tasks) <= 1:
    local, results = queue.SimpleQueue(), []
    _progress = local
    try:
      for task in tasks:
        results.append(convert_shard(task))
        while not local.empty():
          advance(*local.get())
    finally:
      _progress = None
    bar.close()
    return results
  # spawn, not fork: the parent may hold threads (tqdm, absl, TF) that fork would copy mid-state.
  ctx = multiprocessing.get_context("spawn")
  progress_queue = ctx.Queue()
  with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(progress_queue,)) as pool:
    pending = pool.map_async(convert_shard, tasks, chunksize=1)
    while True:
      try:
        advance(*progress_queue.get(timeout=0.1))
      except queue.Empty:
        if pending.ready():
          break
    results = pending.get()
    pool.close()   # let the workers exit on their own: a terminated worker can leave the resource
    pool.join()    # tracker a semaphore that it reports as leaked when this process exits
  while not progress_queue.empty():
    advance(*progress_queue.get())
  bar.close()
  return results
