"""What every benchmark shares: how many rounds a timing takes, the inference batch, the real sample
beside the repository, and the name of the chip the figures come from."""
from pathlib import Path
import platform

import torch

ROUNDS = 3
INFERENCE_BATCH = 256
REPO = Path(__file__).resolve().parent.parent
SHARED_SAMPLE = REPO.parent / "shared/data/galaxy-zoo-sample"


def machine_name(device):
    """The chip the figures come from: the GPU's name, or the CPU model with the flags that decide
    which numerics are fast (bf16 units), as benchmarks/RESULTS.md records beside every figure."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    shown = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    return f"{model}, {torch.get_num_threads()} threads, flags: {' '.join(shown) or 'none of avx2/avx512/amx'}"
