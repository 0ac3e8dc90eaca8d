"""A list of image files cropped once into a uint8 tensor and cached: every file goes through
crop_galaxy under the config's crop settings, on cfg.workers processes, and the result is kept in a
cache folder (images.npy + key.json) until a file or a crop setting changes.

An image that cannot be cropped is no error: it is left out and its reason returned.
"""
import json
import os
from pathlib import Path

import numpy as np

from galaxy.crop import CROP_KEYS, BadImage, crop_galaxy
from galaxy.files import DataError, atomic_write, file_text, remove_dead_temp_files
from galaxy.pool import run_pool, unexpected_error, worker_job

IMAGES, KEY = "images.npy", "key.json"   # the cache folder's two files


def _crop_one(task):
    """Worker: (index, path) -> (index, uint8 (3, S, S) or None, why it was skipped)."""
    index, path = task
    try:
        crop, _ = crop_galaxy(path, worker_job["cfg"])
    except BadImage as err:
        return index, None, str(err)
    except OSError as err:
        return index, None, f"unreadable file: {err.strerror or err}"
    except Exception as err:   # one image must not end the crop of thousands
        return index, None, unexpected_error(err)
    return index, np.asarray(crop, np.uint8).transpose(2, 0, 1).copy(), ""


def crop_all(files, cfg, progress=True):
    """(uint8 (kept, 3, S, S) of the files that crop, in order, [why each file is left out, '' if kept])."""
    images = np.empty((len(files), 3, cfg.image_size, cfg.image_size), np.uint8)
    reasons = [""] * len(files)
    workers = max(1, min(cfg.workers, len(files)))
    for result in run_pool(_crop_one, list(enumerate(files)), workers, {"cfg": cfg}, "crop", progress):
        if result is not None:   # None only while the pool is stopping
            index, crop, reasons[index] = result
            if crop is not None:
                images[index] = crop
    kept = [i for i, reason in enumerate(reasons) if not reason]
    return (images if len(kept) == len(files) else images[kept]), reasons


def cache_key(files, cfg):
    """What the crops depend on: each file's name, size and modification time, and the crop settings."""
    stamps = []
    for file in files:
        try:
            info = os.stat(file)
            stamps.append([file_text(file), info.st_size, info.st_mtime_ns])
        except OSError:   # gone: crop_all will say so
            stamps.append([file_text(file), None, None])
    return {"crop": {key: getattr(cfg, key) for key in CROP_KEYS}, "files": stamps}


def read_cache(cache_dir, key):
    """(images, reasons) saved under this very key, or None."""
    try:
        with open(os.path.join(cache_dir, KEY)) as f:
            saved = json.load(f)
        if saved["key"] != key:
            return None
        images = np.load(os.path.join(cache_dir, IMAGES))
        side = key["crop"]["image_size"]
        if images.dtype == np.uint8 and images.shape == (saved["reasons"].count(""), 3, side, side):
            return images, saved["reasons"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass   # no cache, or a damaged one: cropped again
    return None


def write_cache(cache_dir, key, images, reasons):
    """images.npy, then key.json. The old key goes first, so that a kill between the writes leaves no
    key vouching for other crops. A cache that cannot be written is no error (the run goes on)."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        remove_dead_temp_files(cache_dir)   # a killed run's, up to GBs
        key_path = os.path.join(cache_dir, KEY)
        if os.path.lexists(key_path):
            os.remove(key_path)

        def save_images(tmp):
            with open(tmp, "wb") as f:   # a file object: np.save would add .npy to the temporary name
                np.save(f, images)
        atomic_write(os.path.join(cache_dir, IMAGES), save_images)
        atomic_write(key_path, lambda tmp: Path(tmp).write_text(json.dumps({"key": key, "reasons": reasons})))
        return True
    except (OSError, DataError):   # a read-only or full disk
        return False


def cropped_images(files, cfg, cache_dir, progress=True):
    """(uint8 (kept, 3, S, S), [why each file is left out, '' if kept]): read from cache_dir while every
    file's size and mtime and the crop settings are as they were, else all cropped again and saved there."""
    key = cache_key(files, cfg)
    cached = read_cache(cache_dir, key)
    if cached is None:
        cached = crop_all(files, cfg, progress)
        write_cache(cache_dir, key, *cached)
    return cached
