"""17 members of 160 epochs, for a GPU: rotate ±180° / zoom ±10 % / shift ±3 % with dropout 0.1 and
peak lr 1e-3, trained on the train galaxies only (not final fits), at four crops:
the central 160 px x 6 seeds, 212 px x 5, 128 px x 5 and the ROI crop x 1, seeds from 101.

Measured on the 3,000-galaxy subset (subsets/galaxy_zoo_3000.csv, split_seed 1337), each member
with 8-fold TTA: val RMSE 0.0948 and test RMSE 0.1004 for the seventeen, best member 0.1032, mean
member 0.1048; 2026-11-26 on one NVIDIA H200 (torch 2.11.0+cu130), where 12 such runs side by
side took about 4 minutes. On a 2-core CPU it takes a day or more.

    python train.py --recipe=gpu_ensemble --raw_dir=<Kaggle's files> --ids=subsets/galaxy_zoo_3000.csv
"""
common = {
    "epochs": 160,
    "aug_rotate": 180.0, "aug_zoom": 0.1, "aug_shift": 0.03,
    "dropout": 0.1,
    "lr": 1e-3,
    "members_at_once": 6,
}
groups = [
    {"name": "center160", "crop": "center", "center_crop_size": 160, "seed": 101, "members": 6},
    {"name": "center212", "crop": "center", "center_crop_size": 212, "seed": 101, "members": 5},
    {"name": "center128", "crop": "center", "center_crop_size": 128, "seed": 101, "members": 5},
    {"name": "roi", "crop": "roi", "seed": 101, "members": 1},
]
