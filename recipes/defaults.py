"""The defaults: what `python train.py` trains. One member with config.py's settings: center crop
212 px, decision-tree head, dropout 0.1, flips only, 40 epochs, one-cycle lr 1e-3, batch 64.

Measured on the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv, split_seed 1337: 2,400 train,
300 val, 300 test), 2026-11-26 on a 2-core AMD EPYC CPU with bf16 units (numerics auto: bf16
channels_last): val RMSE 0.1033 (0.1019 with 8-fold TTA), test RMSE 0.1070 (0.1057 with TTA),
against 0.1737 for predicting the mean. About 10 minutes on that CPU.

    python train.py --recipe=defaults --raw_dir=<Kaggle's files> --ids=subsets/galaxy_zoo_3000.csv
"""
common = {}
groups = [
    {"name": "center212", "crop": "center", "center_crop_size": 212, "seed": 1337, "members": 1},
]
