"""The defaults: what `python train.py` trains. One member with config.py's settings: center crop
128 px, decision-tree head, the 8 flips plus rotate ±180° / zoom ±10 % / shift ±3 %, dropout 0.05,
80 epochs, one-cycle peak lr 5e-4, batch 64.

Measured on the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv, split_seed 1337: 2,400 train,
300 val, 300 test), 2026-12-06 on a 2-core Intel Xeon with AMX (numerics auto: bf16 channels_last):
val RMSE 0.1002 (0.0992 with 8-fold TTA), test RMSE 0.1037 (0.1030 with TTA), against 0.1737 for
predicting the mean (at 160 px: val 0.0977, test 0.1016 with TTA; 128 px won on 6,000 galaxies,
benchmarks/ACCURACY.md). About 11 minutes alone on a 2-core CPU with bf16 units, 20-25 on 6,000
galaxies. The quick model, recipes/flips_40.py, takes half the time.

    python train.py --recipe=defaults --raw_dir=<Kaggle's files> --ids=subsets/galaxy_zoo_3000.csv
"""
common = {}
groups = [
    {"name": "center128", "crop": "center", "center_crop_size": 128, "seed": 1337, "members": 1},
]
