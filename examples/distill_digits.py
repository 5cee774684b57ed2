"""OFD end to end on real data, on CPU in a few minutes: scikit-learn's handwritten digits (1797 8x8 images,
upscaled), a ResNet-style teacher, and a narrower, shallower student trained without and with OFD.

    pip install scikit-learn tqdm
    python examples/distill_digits.py            # 3 seeds; --help for the options

For every seed it trains the teacher, then the student twice from the same initialization: with cross-entropy
only (baseline) and with cross-entropy + the OFD loss of ``ofdkern.distill.OFDDistiller`` (automatic pre-ReLU
taps, margins from the teacher's BNs, conv+BN connectors, fused CPU kernel). It prints test accuracy as
mean ± std over the seeds.

Measured with the defaults (3 seeds, about 2 minutes on 2 shared CPU cores), test accuracy in %:
teacher 98.92 ± 0.39, student 95.96 ± 0.56, student + OFD 95.66 ± 0.73 (95.40 ± 0.82 with --alpha 1e-3).
With --epochs 40 (4 minutes): teacher 99.11 ± 0.29, student 97.70 ± 0.65, student + OFD 97.18 ± 0.71.
On this small, easy data set OFD does not beat the baseline student beyond seed-to-seed noise.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import ofdkern
from ofdkern.distill import OFDDistiller


class BasicBlock(nn.Module):
    """torchvision's BasicBlock layout (one ReLU module used after conv1 and after the residual add), which is
    what the distiller's automatic taps recognize."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, one ``layer`` per width (stride 2 from the second on), average pool."""

    def __init__(self, widths: tuple[int, ...], blocks: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, in_channels = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(in_channels if i == 0 else width, width, stride if i == 0 else 1)
                                          for i in range(blocks))))
            in_channels = width
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def load_digits(size: int, test_fraction: float, split_seed: int):
    """(train images, train labels, test images, test labels): float32 (N, 1, size, size), standardized."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    train_index, test_index = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, stratify=labels.numpy(),
        random_state=split_seed)
    mean, std = images[train_index].mean(), images[train_index].std()
    images = (images - mean) / std
    return images[train_index], labels[train_index], images[test_index], labels[test_index]


def random_shift(images: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Augmentation: every image translated by up to ``pixels`` in x and y (zero padding)."""
    size = images.shape[-1]
    padded = F.pad(images, [pixels] * 4)
    offsets = torch.randint(0, 2 * pixels + 1, (len(images), 2), generator=generator)
    return torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])


def batches(images, labels, batch_size: int, generator: torch.Generator, shift: int):
    """Shuffled, augmented full batches (the remainder is dropped: a batch of 2 makes BN statistics noise)."""
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield random_shift(images[index], shift, generator), labels[index]


@torch.no_grad()
def accuracy(model: nn.Module, images, labels) -> float:
    model.eval()
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def train(model: nn.Module, data, args, seed: int, progress: tqdm, distiller: OFDDistiller | None = None):
    """SGD with Nesterov momentum and a cosine schedule; with a distiller, its OFD loss is added to the
    cross-entropy and its connectors train with the student."""
    train_images, train_labels = data
    trained = distiller if distiller is not None else model
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    steps = args.epochs * (len(train_labels) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    trained.train()
    for _epoch in range(args.epochs):
        for x, y in batches(train_images, train_labels, args.batch_size, generator, args.shift):
            if distiller is None:
                loss, distill_loss = F.cross_entropy(model(x), y), None
            else:
                output, distill_loss = distiller(x)
                loss = F.cross_entropy(output, y) + distill_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            postfix = {"loss": f"{loss.item():.3f}"}
            if distill_loss is not None:
                postfix["ofd"] = f"{distill_loss.item():.3f}"
            progress.set_postfix(postfix, refresh=False)
            progress.update()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=16, help="side the 8x8 digits are upscaled to")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--shift", type=int, default=3, help="random translation augmentation, in pixels")
    parser.add_argument("--alpha", type=float, default=1e-4,
                        help="OFD loss weight. The reference used 1e-3 on CIFAR over 200 epochs; here 1e-3 makes the "
                             "OFD loss several times the cross-entropy")
    parser.add_argument("--test-fraction", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_images, train_labels, test_images, test_labels = load_digits(args.size, args.test_fraction, split_seed=0)
    data = (train_images, train_labels)
    cpu_kernel = ofdkern.backend_status()["cpu"]
    kernel = "fused C++ CPU kernel" if cpu_kernel["available"] else f"eager reference ({cpu_kernel['reason']})"
    print(f"digits: {len(train_labels)} train / {len(test_labels)} test images at {args.size}x{args.size}; "
          f"OFD loss: {kernel}")

    teacher_shape, student_shape = ((16, 32, 64), 2), ((4, 8, 16), 1)
    steps_per_model = args.epochs * (len(train_labels) // args.batch_size)
    results = {"teacher": [], "student (baseline)": [], "student (OFD)": []}
    start = time.perf_counter()
    with tqdm(total=3 * args.seeds * steps_per_model, desc="training", unit="step") as progress:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            teacher = ResNet(*teacher_shape)
            progress.set_description(f"seed {seed}: teacher")
            train(teacher, data, args, seed, progress)
            results["teacher"].append(accuracy(teacher, test_images, test_labels))

            torch.manual_seed(1000 + seed)
            baseline = ResNet(*student_shape)
            distilled = ResNet(*student_shape)
            distilled.load_state_dict(baseline.state_dict())  # same initialization for both students

            progress.set_description(f"seed {seed}: student")
            train(baseline, data, args, seed, progress)
            results["student (baseline)"].append(accuracy(baseline, test_images, test_labels))

            progress.set_description(f"seed {seed}: student + OFD")
            distiller = OFDDistiller(teacher, distilled, alpha=args.alpha)
            train(distilled, data, args, seed, progress, distiller=distiller)
            results["student (OFD)"].append(accuracy(distilled, test_images, test_labels))

    parameters = {"teacher": ResNet(*teacher_shape), "student (baseline)": ResNet(*student_shape)}
    parameters["student (OFD)"] = parameters["student (baseline)"]
    print(f"\ntest accuracy over {args.seeds} seeds ({time.perf_counter() - start:.0f} s)")
    print(f"{'model':<20} {'parameters':>10}  {'accuracy (%)':>14}  per seed")
    for name, values in results.items():
        mean = 100 * statistics.mean(values)
        std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
        count = sum(p.numel() for p in parameters[name].parameters())
        per_seed = " ".join(f"{100 * v:.2f}" for v in values)
        print(f"{name:<20} {count:>10}  {mean:>6.2f} ± {std:<5.2f}  {per_seed}")


if __name__ == "__main__":
    main()
