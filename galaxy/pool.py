"""The worker pool behind preprocessing and prediction: one process per core, a progress bar in
img/s, and an ending (error, Ctrl-C, a consumer that stops) that never hangs, even with a worker
blocked in a read that never returns.

A task function reads what it needs from worker_job, set once per worker by start_worker.
"""
from functools import partial
import multiprocessing
from multiprocessing import Pool
import os
import signal
import threading
import time

from tqdm import tqdm

from galaxy.files import forget_open_folders
from galaxy.kaggle_raw import forget_open_zips

worker_job = {}   # what each worker needs, set once per process by start_worker
worker_stop = None   # each worker's copy of its run_pool's stop event
worker_busy = False   # True while this worker runs a task: only then does a nudge abandon it
NUDGE = signal.SIGUSR1   # the parent's "abandon your task" to its workers once the run is ending
NUDGE_EVERY_S = 0.2   # a blocked worker is nudged this often...
STOP_WAIT_S = 10.0   # ...and the pool terminated if it has not ended after this long


class Abandoned(BaseException):
    """Raised in a worker's task by the parent's nudge: no Exception, so no task's except clause keeps it."""


def _abandon(signum, frame):
    global worker_busy
    if worker_busy:
        worker_busy = False   # one Abandoned per task at most: _unless_stopped catches exactly one
        raise Abandoned


def start_worker(job, stop):
    global worker_stop
    signal.signal(NUDGE, _abandon)   # first: the default action of SIGUSR1 would end the worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    # Pool.terminate's SIGTERM must end a worker: a handler inherited from the parent (train.py's
    # saves last.pt) would keep one blocked on the task queue's lock alive, and terminate() waiting
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    forget_open_zips()
    forget_open_folders()
    worker_job.update(job)
    worker_stop = stop


def _unless_stopped(function, task):
    """Worker: function(task), or None at once when the run is ending early (see run_pool), or
    None when the parent abandons the task (a read blocked on a FIFO or a dead network mount)."""
    global worker_busy
    if worker_stop.is_set():
        return None
    try:
        try:
            worker_busy = True
            return function(task)
        finally:
            worker_busy = False
    except Abandoned:
        return None


def _end_early(pool):
    """Let the workers finish after stop is set: pool.join(), nudging the ones that do not.

    Waiting for the workers (rather than Pool.terminate(): see run_pool) hangs if one is blocked
    in a call that never returns, such as opening a FIFO no one writes to, so the first Ctrl-C
    would only print its message. A signal interrupts such a call: each worker still running
    gets NUDGE every NUDGE_EVERY_S, which abandons its task (Abandoned) if it is in one and is
    ignored otherwise, so no worker is ever stopped inside the pool's queues. A worker that even
    this cannot move (a read the kernel will not interrupt) is terminated after STOP_WAIT_S: by
    then every other worker has long answered its tasks and waits idle, so terminate() kills none
    while it writes a result, which is how terminate() hung before.
    """
    pool.close()
    joining = threading.Thread(target=pool.join, daemon=True)
    joining.start()
    deadline = time.monotonic() + STOP_WAIT_S
    while joining.is_alive() and time.monotonic() < deadline:
        for worker in list(pool._pool):   # the pool's own live workers: another pool's must not be nudged
            if worker.pid is not None and worker.exitcode is None:
                try:
                    os.kill(worker.pid, NUDGE)
                except ProcessLookupError:   # it ended meanwhile
                    pass
        joining.join(NUDGE_EVERY_S)
    if joining.is_alive():
        pool.terminate()


def run_pool(function, tasks, workers, job, description, progress=True, ordered=False, total=None):
    """Yield function(task) for every task from a pool of workers, with a progress bar in img/s.

    tasks is listed first, unless total (its length, for the bar) is given: then it may be a
    generator, which the pool's task thread reads as it hands tasks out (galaxy/survey.py bounds it).

    A run that ends early (an error, Ctrl-C, a consumer that stops) lets its workers finish
    instead of killing them: Pool.terminate() kills a worker even while it holds the result
    queue's lock, and then waits forever for that lock (seen here: 2 hangs in about 450 runs
    stopped by a full disk under load). The stop event makes the tasks still queued return at once.
    """
    if total is None:
        tasks = list(tasks)
        total = len(tasks)
    chunk = max(1, min(32, total // (8 * workers)))
    stop = multiprocessing.Event()
    with Pool(workers, initializer=start_worker, initargs=(job, stop)) as pool:
        try:
            results = (pool.imap if ordered else pool.imap_unordered)(partial(_unless_stopped, function), tasks,
                                                                      chunksize=chunk)
            yield from tqdm(results, total=total, desc=description, unit="img",
                            disable=not progress, smoothing=0.1)
        except BaseException:
            stop.set()
            _end_early(pool)   # each worker ends (or abandons) its current image, then answers the rest at once
            raise


def unexpected_error(err):
    """The skip reason for an exception no one foresaw; Ctrl-C and exits are no Exception and still stop."""
    return f"unexpected error: {type(err).__name__}: {err}"
