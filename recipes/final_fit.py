"""One member of four_crops, the best single model measured: a final fit (trained on train + val
galaxies) at the central 160 px, 80 epochs with rotate ±180° / zoom ±10 % / shift ±3 %, dropout
0.05, peak lr 5e-4, seed 501.

Measured on the 300 test galaxies of the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv,
split_seed 1337): test RMSE 0.1003 with 8-fold TTA; 2026-12 on a 2-core CPU with bf16 units,
torch 2.14.1. About 20 minutes on such a CPU (22-24 minutes when two train side by side).

    python train.py --recipe=final_fit --raw_dir=<Kaggle's files> --ids=subsets/galaxy_zoo_3000.csv
"""
common = {
    "train_on_val": True,
    "epochs": 80,
    "aug_rotate": 180.0, "aug_zoom": 0.1, "aug_shift": 0.03,
    "dropout": 0.05,
    "lr": 5e-4,
}
groups = [
    {"name": "center160", "crop": "center", "center_crop_size": 160, "seed": 501, "members": 1},
]
