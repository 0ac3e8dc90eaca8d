"""The quick model: one member at the central 212 px, flips only, 40 epochs, dropout 0.1, one-cycle
peak lr 1e-3. Half the time of the defaults and 0.002-0.005 worse; the model of the learning curve
(python bench.py curve).

Measured on the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv, split_seed 1337: 2,400 train,
300 val, 300 test), 2026-11-26 on a 2-core AMD EPYC CPU with bf16 units (numerics auto: bf16
channels_last): val RMSE 0.1033 (0.1019 with 8-fold TTA), test RMSE 0.1070 (0.1057 with TTA),
against 0.1737 for predicting the mean. About 10 minutes on that CPU.

    python train.py --recipe=flips_40 --raw_dir=<Kaggle's files> --ids=subsets/galaxy_zoo_3000.csv
"""
common = {
    "epochs": 40,
    "aug_rotate": 0.0, "aug_zoom": 0.0, "aug_shift": 0.0,
    "dropout": 0.1,
    "lr": 1e-3,
}
groups = [
    {"name": "center212", "crop": "center", "center_crop_size": 212, "seed": 1337, "members": 1},
]
