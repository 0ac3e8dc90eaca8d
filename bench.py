"""Speed and accuracy benchmarks, one subcommand each:

    python bench.py preprocess            # preprocessing vs. plain JPEG decoding, img/s and ratio
    python bench.py train                 # training img/s: model alone vs. the whole pipeline, FLOP/s
    python bench.py accuracy              # the table of benchmarks/ACCURACY.md, trained from scratch
    python bench.py curve                 # test RMSE against training galaxies (375 ... 5,100), fitted
    python bench.py finetune              # 5 classes: accuracy against 100 ... all labels, fine-tuned vs scratch
    python bench.py similar               # load + nearest search over 141,553 x 2048 float16 embeddings
    python bench.py scale                 # Kaggle-sized rehearsal: preprocess, train, predict on 141,553 images
    python bench.py scale --scale=0.002   # the same steps on 0.2 % of that (123 + 160 images)
    python bench.py survey --scale=0.02   # predict.py --catalog on 20,000 rows (1.0: a million), kill -9 and resume
    python bench.py gpu                   # every CUDA check in one run, with a table for benchmarks/RESULTS.md
    python bench.py preprocess --raw_dir=data/raw --workers=4

Each subcommand is a function in benchmarks/; the remaining arguments are config overrides. raw_dir defaults to the real sample in ../shared/data/galaxy-zoo-sample.
"""
import sys

from benchmarks.accuracy import run_accuracy
from benchmarks.common import SHARED_SAMPLE
from benchmarks.curve import run_curve
from benchmarks.finetune import run_finetune
from benchmarks.gpu import bench_gpu
from benchmarks.scale import bench_scale
from benchmarks.speed import bench_preprocess, bench_similar, bench_train
from benchmarks.survey import bench_survey
from config import answer_help, build_config, parse_overrides, script_keys

SUBCOMMANDS = {"accuracy": run_accuracy, "curve": run_curve, "finetune": run_finetune, "gpu": bench_gpu,
               "preprocess": bench_preprocess, "scale": bench_scale, "similar": bench_similar, "survey": bench_survey,
               "train": bench_train}


def main():
    names = "|".join(SUBCOMMANDS)
    answer_help(sys.argv[1:], __doc__, script_keys("bench"), positional=[names])
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        sys.exit(f"usage: python bench.py <{names}> [--key=value ...]; see python bench.py --help")
    try:
        overrides, _ = parse_overrides(sys.argv[2:])
        cfg = build_config({"raw_dir": str(SHARED_SAMPLE), **overrides})
    except ValueError as err:
        sys.exit(f"error: {err}")
    SUBCOMMANDS[sys.argv[1]](cfg, overrides)


if __name__ == "__main__":
    main()
