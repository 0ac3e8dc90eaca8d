"""The worker pool behind preprocessing and prediction: one process per core, a progress bar in
img/s, and an ending (error, Ctrl-C, a consumer that stops) that never hangs.

A task function reads what it needs from worker_job, set once per worker by start_worker.
"""
from functools import partial
import multiprocessing
from multiprocessing import Pool
import signal

from tqdm import tqdm

from galaxy.files import forget_open_folders
from galaxy.kaggle_raw import forget_open_zips

worker_job = {}   # what each worker needs, set once per process by start_worker
worker_stop = None   # each worker's copy of its run_pool's stop event


def start_worker(job, stop):
    global worker_stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    forget_open_zips()
    forget_open_folders()
    worker_job.update(job)
    worker_stop = stop


def _unless_stopped(function, task):
    """Worker: function(task), or None at once when the run is ending early (see run_pool)."""
    return None if worker_stop.is_set() else function(task)


def run_pool(function, tasks, workers, job, description, progress=True, ordered=False):
    """Yield function(task) for every task from a pool of workers, with a progress bar in img/s.

    A run that ends early (an error, Ctrl-C, a consumer that stops) lets its workers finish
    instead of killing them: Pool.terminate() kills a worker even while it holds the result
    queue's lock, and then waits forever for that lock (seen here: 2 hangs in about 450 runs
    stopped by a full disk under load). The stop event makes the tasks still queued return at once.
    """
    tasks = list(tasks)
    chunk = max(1, min(32, len(tasks) // (8 * workers)))
    stop = multiprocessing.Event()
    with Pool(workers, initializer=start_worker, initargs=(job, stop)) as pool:
        try:
            results = (pool.imap if ordered else pool.imap_unordered)(partial(_unless_stopped, function), tasks,
                                                                      chunksize=chunk)
            yield from tqdm(results, total=len(tasks), desc=description, unit="img",
                            disable=not progress, smoothing=0.1)
        except BaseException:
            stop.set()
            pool.close()
            pool.join()   # each worker ends its current image, then answers the queued tasks at once
            raise


def unexpected_error(err):
    """The skip reason for an exception no one foresaw; Ctrl-C and exits are no Exception and still stop."""
    return f"unexpected error: {type(err).__name__}: {err}"
