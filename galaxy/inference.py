"""Running a trained model over a batch of uint8 images: vote fractions per view (8 with TTA), the
penultimate features for embeddings, and the Kaggle metric."""
import numpy as np
import torch

from dataset import NUM_OUTPUTS, dihedral
from galaxy.numerics import autocast, prepare_batch


INFERENCE_BATCH = 256   # the least images per forward pass on a GPU (benchmarks/common.py times inference so)


def inference_batch(cfg, device):
    """Images per forward pass: batch_size, and at least INFERENCE_BATCH on a GPU, where a training-sized
    batch's fixed costs (the copy in, the kernel launches, the copy out) would leave it waiting."""
    return max(cfg.batch_size, INFERENCE_BATCH) if device.type == "cuda" else cfg.batch_size


def batch_tensor(crops, pin=False):
    """uint8 (B, 3, S, S) of B HWC crops; pin: in page-locked memory, so that the copy to the GPU
    (non_blocking in prepare_batch) runs while the CPU goes on instead of being staged and waited for."""
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)
    if not pin:
        return images.contiguous()
    return torch.empty(images.shape, dtype=torch.uint8, pin_memory=True).copy_(images)


@torch.no_grad()
def predict_views(model, images_uint8, batch_size=256, amp=False, channels_last=False, tta=False, embed=False,
                  progress=None):
    """(vote fractions of each view (V, N, 37), features (N, 2048) averaged over the views or None).

    V is 8 with tta (the symmetries of the square, model inputs dihedral(images, k)), else 1.
    amp and channels_last are booleans (see choose_numerics); with channels_last the model is
    moved to that layout, which load_state_dict and state_dict do not care about. With embed the
    penultimate features come from the same forward pass. progress, if given, is called with the
    number of images done after each batch. Everything returned lives on the CPU.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    views, features = [], []
    for start in range(0, len(images_uint8), batch_size):
        batch = prepare_batch(images_uint8[start:start + batch_size], device, channels_last)
        with autocast(device, amp):
            outputs = [model.forward_with_features(dihedral(batch, k)) for k in range(8 if tta else 1)]
        views.append(torch.stack([votes.float() for votes, _ in outputs]).cpu())
        if embed:
            features.append((sum(f.float() for _, f in outputs) / len(outputs)).cpu())
        if progress:
            progress(len(batch))
    model.train(was_training)
    if not views:
        width = model.classifier[-1].in_features
        return torch.zeros(8 if tta else 1, 0, NUM_OUTPUTS), (torch.zeros(0, width) if embed else None)
    return torch.cat(views, 1), (torch.cat(features) if embed else None)


def predict(model, images_uint8, batch_size=256, amp=False, channels_last=False, tta=False, progress=None):
    """Vote fractions (N, 37) on the CPU for uint8 images (N, 3, S, S); with tta the mean over the 8 views."""
    return predict_views(model, images_uint8, batch_size, amp, channels_last, tta, progress=progress)[0].mean(0)


def rmse(predictions, targets):
    """The Kaggle metric: root mean squared error over every galaxy and all 37 outputs."""
    return torch.sqrt(torch.mean((predictions.float() - targets.float()) ** 2)).item()
