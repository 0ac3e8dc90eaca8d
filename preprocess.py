"""Turn Kaggle's Galaxy Zoo JPEGs into small square PNGs and a clean labels.csv.

    python preprocess.py                     # data/raw -> data/processed
    python preprocess.py --crop=center       # the Kaggle winner's fixed central crop
    python preprocess.py --demo              # synthetic galaxies in Kaggle's layout, then preprocess them

raw_dir holds Kaggle's files as downloaded (zips, read in place) or extracted. Each galaxy is
cropped around the central galaxy (crop=roi) or to a fixed central square (crop=center) and
written as processed_dir/{train,test}/<GalaxyID>.png. Re-runs skip PNGs that are already
complete; every file gets its name only when it is whole, so a killed run leaves no
half-written file. Unusable input is listed in processed_dir/skipped.csv, never fatal.
Images of any size are accepted (Kaggle's are all 424x424); ones smaller than image_size are skipped.
"""
import sys
import time

from config import get_config, script_keys
from dataset import DataError
from galaxy.demo import make_demo
from galaxy.preprocessing import preprocess


def main():
    cfg = get_config(doc=__doc__, keys=script_keys("preprocess"))
    started = time.perf_counter()
    try:
        if cfg.demo:
            make_demo(cfg.raw_dir, cfg.demo_train, cfg.demo_test, cfg.seed, cfg.workers)
        preprocess(cfg)
    except DataError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        print("\ninterrupted: the PNGs already written are kept; run the same command again to finish",
              file=sys.stderr)
        sys.exit(130)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
