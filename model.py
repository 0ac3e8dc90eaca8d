"""The network: the baseline CNN of the original design (four conv blocks, three linear layers)
and its output heads: Galaxy Zoo's 37 vote fractions (tree or sigmoid), or a head sized to a
user's own labels (logits for classes, linear for numbers; galaxy/tasks.py). Loading checkpoints
lives in galaxy/checkpoints.py, running the model in galaxy/inference.py and galaxy/numerics.py.

    python model.py [--image_size=64 --output=tree]   # each layer's output shape and weight count

Shapes at 64x64 input (each conv has stride 1 and padding 1, each pool halves):
    conv 9x9:  64 -> 58, pool -> 29      conv 5x5: 29 -> 27, pool -> 13
    conv 3x3:  13 -> 13, pool -> 6       conv 1x1:  6 ->  8, pool ->  4
    flatten: 512 * 4 * 4 = 8192
"""
import torch
import torch.nn as nn

from config import MIN_IMAGE_SIZE, Config, get_config, script_keys
from dataset import LABEL_COLUMNS, NUM_OUTPUTS, QUESTIONS


def conv_block(in_channels, out_channels, kernel_size):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=2, stride=2),
    )


KERNEL_SIZES = (9, 5, 3, 1)   # of the four conv blocks; each conv has stride 1 and padding 1, each pool halves


def feature_side(image_size):
    """Side of the last block's output for a square input of this side; 0 if a conv or pool on the
    way would leave no pixel (torch's "Output size is too small")."""
    side = image_size
    for kernel_size in KERNEL_SIZES:
        side = (side + 2 - kernel_size + 1) // 2
        if side < 1:
            return 0
    return side


def flat_features(image_size):
    """Length of the flattened feature vector for a square input of this side."""
    return 512 * feature_side(image_size) ** 2


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


class ClassLogits(nn.Module):
    """The "logits" head: class scores as they are for the loss (cross-entropy), probabilities as predictions."""

    def forward(self, logits):
        return logits

    def predict(self, outputs):
        return torch.softmax(outputs, dim=1)


class Standardised(nn.Module):
    """The "linear" head: numbers trained standardised (each column to mean 0, spread 1, so that columns
    of any unit weigh alike in the loss), predicted in the targets' own units. mean and std are buffers:
    the checkpoint carries them with the weights."""

    def __init__(self, num_outputs, mean=None, std=None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_outputs) if mean is None else torch.tensor(mean).float())
        self.register_buffer("std", torch.ones(num_outputs) if std is None else torch.tensor(std).float())

    def forward(self, outputs):
        return outputs

    def predict(self, outputs):
        return outputs * self.std + self.mean


HEADS = ("tree", "sigmoid", "logits", "linear")
TASK_HEADS = {"classes": "logits", "numbers": "linear"}   # a user's labels (galaxy/tasks.py) -> the head
FREEZE = {"none": 0, "features": 1, "hidden": 2}           # how much of the network --freeze fixes


class GalaxyCNN(nn.Module):
    def __init__(self, image_size=64, output="sigmoid", dropout=0.5, num_outputs=NUM_OUTPUTS, mean=None, std=None):
        super().__init__()
        if output not in HEADS or (output in ("tree", "sigmoid") and num_outputs != NUM_OUTPUTS):
            raise ValueError(f"no {output} head of {num_outputs} outputs: tree and sigmoid give Galaxy Zoo's "
                             f"{NUM_OUTPUTS}, logits and linear any number")
        if feature_side(image_size) < 1:   # config.MIN_IMAGE_SIZE says the same before any model is built
            raise ValueError(f"image_size {image_size} is too small for the network: its convolutions and "
                             f"poolings leave no pixel below {MIN_IMAGE_SIZE}")
        channels = (3, 64, 128, 256, 512)
        self.features = nn.Sequential(
            *(conv_block(channels[i], channels[i + 1], k) for i, k in enumerate(KERNEL_SIZES)),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_features(image_size), 1024), nn.Dropout(dropout), nn.ReLU(inplace=True),
            nn.Linear(1024, 2048), nn.Dropout(dropout), nn.ReLU(inplace=True),
            nn.Linear(2048, num_outputs),  # the original design's diagram says 128 inputs; the layer before gives 2048
        )
        self.head = (nn.Sigmoid() if output == "sigmoid" else DecisionTreeHead() if output == "tree"
                     else ClassLogits() if output == "logits" else Standardised(num_outputs, mean, std))
        self.task = None     # build_model: the task record of a head for a user's labels (None: Galaxy Zoo's)
        self.frozen = []     # freeze(): the parts that neither train nor leave eval mode

    def forward(self, images):
        """images: float (N, 3, H, W) in [0, 1]; returns what the loss takes: (N, 37) vote fractions in
        (0, 1), or a task head's class logits or standardised numbers."""
        features = self.classifier[:-1](self.features(images))
        return self.head(self.classifier[-1](features).float())

    def forward_with_features(self, images):
        """(predictions (N, outputs), the 2048 penultimate features (N, 2048)) from one forward pass.

        The predictions are vote fractions, class probabilities or numbers in the targets' units. The
        features are the input of the last Linear, after its ReLU: what "galaxies like this one" are
        compared by (predict.py --embed).
        """
        features = self.classifier[:-1](self.features(images))
        outputs = self.head(self.classifier[-1](features).float())
        return (self.head.predict(outputs) if isinstance(self.head, (ClassLogits, Standardised)) else outputs), features

    def freeze(self, part):
        """Fix the conv blocks ("features"), or them and the hidden linear layers ("hidden"): no gradients,
        and in eval mode whatever train() says, so BatchNorm keeps the running statistics it was loaded
        with (and the frozen layers' dropout is off): a fixed feature extractor under the new layers."""
        self.frozen = [self.features, self.classifier[:-1]][:FREEZE[part]]
        for module in self.frozen:
            module.requires_grad_(False)
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self


def build_model(cfg: Config, task=None):
    """The network of cfg; task, a checkpoint's task record ({"kind", "names", "mean", "std"}; see
    galaxy/tasks.py), gives it a head for a user's labels instead of Galaxy Zoo's 37 outputs."""
    if task is None:
        return GalaxyCNN(image_size=cfg.image_size, output=cfg.output, dropout=cfg.dropout)
    model = GalaxyCNN(cfg.image_size, TASK_HEADS[task["kind"]], cfg.dropout, len(task["names"]), task.get("mean"),
                      task.get("std"))
    model.task = task
    return model



def layer_table(model, image_size):
    """(name, output shape, weights) per conv block and linear layer for one image of this side."""
    rows, x = [], torch.zeros(1, 3, image_size, image_size)
    model.eval()
    with torch.no_grad():
        for index, block in enumerate(model.features[:-1]):
            x = block(x)
            conv = block[0]
            rows.append((f"conv {conv.kernel_size[0]}x{conv.kernel_size[0]} + pool {index + 1}", tuple(x.shape[1:]),
                         sum(p.numel() for p in block.parameters())))
        x = model.features[-1](x)
        rows.append(("flatten", tuple(x.shape[1:]), 0))
        for layer in model.classifier:
            x = layer(x)
            if isinstance(layer, nn.Linear):
                rows.append((f"linear {layer.in_features} -> {layer.out_features}", tuple(x.shape[1:]),
                             sum(p.numel() for p in layer.parameters())))
    return rows


def main():
    cfg = get_config(doc=__doc__, keys=script_keys("model"))
    model = build_model(cfg)
    for name, shape, weights in layer_table(model, cfg.image_size):
        print(f"{name:<24} {str(shape):<18} {weights:>12,}")
    print(f"{'total':<24} {'':<18} {sum(p.numel() for p in model.parameters()):>12,}  ({cfg.output} head)")


if __name__ == "__main__":
    main()
