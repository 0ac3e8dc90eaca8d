"""The defaults: what `python train.py` trains. One member with config.py's settings: center crop
160 px, decision-tree head, the 8 flips plus rotate ±180° / zoom ±10 % / shift ±3 %, dropout 0.05,
80 epochs, one-cycle peak lr 5e-4, batch 64.

Measured on the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv, split_seed 1337: 2,400 train,
300 val, 300 test), 2026-12-03 on a 2-core Intel Xeon with AMX (numerics auto: bf16 channels_last):
val RMSE 0.0984 (0.0977 with 8-fold TTA), test RMSE 0.1022 (0.1016 with TTA), against 0.1737 for
predicting the mean. About 20 minutes on a 2-core CPU with bf16 units. The quick model,
recipes/flips_40.py, takes half the time.

    python train.py --recipe=defaults --raw_dir=<Kaggle's files> --ids=subsets/galaxy_zoo_3000.csv
"""
common = {}
groups = [
    {"name": "center160", "crop": "center", "center_crop_size": 160, "seed": 1337, "members": 1},
]
