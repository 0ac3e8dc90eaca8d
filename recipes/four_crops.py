"""The best measured ensemble: eight final fits (trained on train + val galaxies) of one recipe,
80 epochs with rotate ±180° / zoom ±10 % / shift ±3 %, dropout 0.05, peak lr 5e-4, at four crops
(the central 212, 160 and 128 px, and the galaxy's own box, ROI), two seeds each from 501.

Measured on the 300 test galaxies of the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv,
split_seed 1337), each member with 8-fold TTA: test RMSE 0.0987 for the eight, best member 0.1003
(160 px, seed 501), mean member 0.1019; trained 2026-12-04 on a 2-core Intel Xeon with AMX, torch
2.14.1. About 1.5 hours on such a CPU, two members at a time (22-24 minutes a
member); a final fit has no val split, so there is no val score.

    python train.py --recipe=four_crops --raw_dir=<Kaggle's files> --ids=subsets/galaxy_zoo_3000.csv
"""
common = {
    "train_on_val": True,
    "epochs": 80,
    "aug_rotate": 180.0, "aug_zoom": 0.1, "aug_shift": 0.03,
    "dropout": 0.05,
    "lr": 5e-4,
    "members_at_once": 2,
}
groups = [
    {"name": "center212", "crop": "center", "center_crop_size": 212, "seed": 501, "members": 2},
    {"name": "center160", "crop": "center", "center_crop_size": 160, "seed": 501, "members": 2},
    {"name": "center128", "crop": "center", "center_crop_size": 128, "seed": 501, "members": 2},
    {"name": "roi", "crop": "roi", "seed": 501, "members": 2},
]
