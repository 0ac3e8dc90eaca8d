"""The seed CNN (four conv blocks, three linear layers) and its two output heads,
plus loading a trained model back from a checkpoint.

Shapes at 64x64 input (each conv has stride 1 and padding 1, each pool halves):
    conv 9x9:  64 -> 58, pool -> 29      conv 5x5: 29 -> 27, pool -> 13
    conv 3x3:  13 -> 13, pool -> 6       conv 1x1:  6 ->  8, pool ->  4
    flatten: 512 * 4 * 4 = 8192
"""
import torch
import torch.nn as nn

from config import Config, config_from_dict
from dataset import LABEL_COLUMNS, NUM_OUTPUTS, QUESTIONS, dihedral


def conv_block(in_channels, out_channels, kernel_size):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )


def flat_features(image_size):
    """Length of the flattened feature vector for a square input of this side."""
    side = image_size
    for kernel_size in (9, 5, 3, 1):
        side = (side + 2 - kernel_size + 1) // 2
    return 512 * side * side


class DecisionTreeHead(nn.Module):
    """Turns 37 logits into vote fractions that obey the Galaxy Zoo decision tree.

    Each question's answers are a softmax over its logits, scaled by the vote fraction
    of the answer that leads to the question (as in the Kaggle winner's solution), so
    e.g. Q3's answers sum to Class2.2 and Q1's to 1. QUESTIONS is in an order where every
    parent comes before its children.
    """

    def __init__(self):
        super().__init__()
        self.slices, self.parent_index = [], []
        start = 0
        for q in QUESTIONS:
            self.slices.append((start, start + len(q.answers)))
            self.parent_index.append(LABEL_COLUMNS.index(q.parent) if q.parent else -1)
            start += len(q.answers)

    def forward(self, logits):
        logits = logits.float()  # the softmax and products in fp32 even under autocast
        answers = []
        for (start, end), parent in zip(self.slices, self.parent_index):
            fractions = torch.softmax(logits[:, start:end], dim=1)
            if parent >= 0:
                # parents precede children, so the parent's column is already in `answers`
                fractions = fractions * torch.cat(answers, dim=1)[:, parent:parent + 1]
            answers.append(fractions)
        return torch.cat(answers, dim=1)


class GalaxyCNN(nn.Module):
    def __init__(self, image_size=64, output="sigmoid", dropout=0.5):
        super().__init__()
        self.features = nn.Sequential(
            conv_block(3, 64, 9),
            conv_block(64, 128, 5),
            conv_block(128, 256, 3),
            conv_block(256, 512, 1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(image_size), 1024), nn.Dropout(dropout), nn.ReLU(inplace=True),
            nn.Linear(1024, 2048), nn.Dropout(dropout), nn.ReLU(inplace=True),
            nn.Linear(2048, NUM_OUTPUTS),  # the seed's diagram says 128 inputs; the layer before gives 2048
        )
        self.head = nn.Sigmoid() if output == "sigmoid" else DecisionTreeHead()

    def forward(self, images):
        """images: float (N, 3, H, W) in [0, 1]; returns (N, 37) vote fractions in (0, 1)."""
        return self.head(self.classifier(self.features(images)).float())


def build_model(cfg: Config):
    return GalaxyCNN(image_size=cfg.image_size, output=cfg.output, dropout=cfg.dropout)


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(path, map_location="cpu"):
    """The dict saved by train.py, loaded safely; CheckpointError with the fix if unusable."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found; train one with `python train.py` "
                              f"or pass --checkpoint=<out_dir>/best.pt") from None
    except Exception as err:  # truncated file, not a torch file, pickled objects, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}); "
                              f"it is not a checkpoint written by train.py") from None


def load_state(model, state_dict, path):
    """load_state_dict with a one-line explanation when the shapes do not match."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint {path} was saved from a different model ({first}); "
                              f"use a checkpoint trained with the same image_size and output, "
                              f"or start afresh without --resume") from None


def load_model(path, device="cpu"):
    """Rebuild the trained model from a checkpoint: returns (model in eval mode, its Config)."""
    return model_from_checkpoint(read_checkpoint(path), path, device)


def model_from_checkpoint(checkpoint, path, device="cpu"):
    """load_model for a checkpoint already read (by read_checkpoint) from path."""
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} has no model/config; it was not written by train.py")
    cfg = config_from_dict(checkpoint["config"])
    model = build_model(cfg)
    load_state(model, checkpoint["model"], path)
    return model.to(device).eval(), cfg


# --- running the model -------------------------------------------------------------

def resolve_device(name):
    """'auto' picks CUDA when there is one; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device=cuda but torch sees no CUDA GPU; use --device=cpu or auto")
    return torch.device(name)


def autocast(device, enabled=True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def prepare_batch(images_uint8, device, channels_last):
    images = images_uint8.to(device, non_blocking=True).float().div_(255)
    if channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


@torch.no_grad()
def predict(model, images_uint8, batch_size=256, amp=True, channels_last=True, tta=False, progress=None):
    """Vote fractions (N, 37) on the CPU for uint8 images (N, 3, S, S).

    With tta, the prediction is the mean over the 8 symmetries of the square. progress, if
    given, is called with the number of images done after each batch.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images_uint8), batch_size):
        batch = prepare_batch(images_uint8[start:start + batch_size], device, channels_last)
        with autocast(device, amp):
            views = range(8) if tta else range(1)
            prediction = sum(model(dihedral(batch, k)).float() for k in views) / len(views)
        outputs.append(prediction.cpu())
        if progress:
            progress(len(batch))
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0, NUM_OUTPUTS)


def rmse(predictions, targets):
    """The Kaggle metric: root mean squared error over every galaxy and all 37 outputs."""
    return torch.sqrt(torch.mean((predictions.float() - targets.float()) ** 2)).item()
