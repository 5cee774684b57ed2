"""OFD through torchdistill: a torchvision resnet34 teacher distilled into a resnet18 with torchdistill's
DistillationBox and ofdkern's plug-in (``ofdkern.integrations.torchdistill``), on scikit-learn's handwritten
digits (shipped with scikit-learn: nothing to download), upscaled and replicated to 3-channel images.

    pip install torchdistill scikit-learn
    python examples/torchdistill/distill_digits.py      # --help for the options

The configuration is ``resnet18_from_resnet34.yaml`` beside this script. The script builds the datasets under
the ids the configuration names, trains the teacher with plain cross-entropy (``teacher_training``), then runs
the configuration's ``train`` section through a DistillationBox: cross-entropy plus ``alpha`` times the OFD loss
of the four stages, with ofdkern's in-place-safe pre-ReLU taps, BN margins and conv+BN connectors. It prints the
OFD term of every epoch and the test accuracy of both models.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset
from torchdistill.common.yaml_util import load_yaml_file
from torchdistill.core.distillation import DistillationBox

import ofdkern.integrations.torchdistill  # noqa: F401  (registers "ofdkern.FeatureTaps" and the losses)

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet18_from_resnet34.yaml")


def digits_datasets(size: int, train_images: int | None, seed: int = 0) -> dict:
    """{"digits/train", "digits/test"}: half of the 1797 digits each (stratified), (3, size, size) float32
    images standardized with the training mean and std; ``train_images`` keeps only that many for training."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor(digits.target)
    train, test = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.5, stratify=labels.numpy(),
                                   random_state=seed)
    train = train[:train_images]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return {"digits/train": TensorDataset(images[train], labels[train]),
            "digits/test": TensorDataset(images[test], labels[test])}


def train_teacher(model, dataset, epochs: int, batch_size: int, lr: float) -> None:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) > batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs * len(loader), 1))
    model.train()
    for epoch in range(epochs):
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"teacher epoch {epoch + 1}/{epochs}: cross-entropy {loss.item():.3f}", flush=True)


@torch.no_grad()
def accuracy(model, dataset, batch_size: int) -> float:
    model.eval()
    correct = sum((model(images).argmax(dim=1) == labels).sum().item()
                  for images, labels in DataLoader(dataset, batch_size=batch_size))
    return 100.0 * correct / len(dataset)


def distil(box: DistillationBox, epochs: int) -> None:
    """torchdistill's training loop; a forward hook on the OFD sub-term reports its value."""
    ofd_term = box.criterion.term_dict["ofd"][0]
    ofd_values = []
    ofd_term.register_forward_hook(lambda _module, _args, value: ofd_values.append(value.item()))
    for epoch in range(epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        box.post_epoch_process()
        print(f"student epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, ofd loss {ofd_values[-1]:.4g} "
              f"(mean over the epoch {sum(ofd_values) / len(ofd_values):.4g})", flush=True)
        ofd_values.clear()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--teacher-epochs", type=int, help="default: the config's teacher_training.num_epochs")
    parser.add_argument("--epochs", type=int, help="distillation epochs; default: the config's train.num_epochs")
    parser.add_argument("--size", type=int, default=32, help="side the 8x8 digits are upscaled to")
    parser.add_argument("--train-images", type=int, help="use only this many training images (for a quick run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = load_yaml_file(args.config)
    teacher_config, train_config = config["teacher_training"], config["train"]
    if args.epochs is not None:
        train_config["num_epochs"] = args.epochs
    datasets = digits_datasets(args.size, args.train_images)
    models = {role: torchvision.models.get_model(spec["key"], **spec.get("kwargs", {}))
              for role, spec in config["models"].items()}
    teacher, student = models["teacher_model"], models["student_model"]
    test_set, test_batch = datasets[config["test"]["dataset_id"]], config["test"]["batch_size"]
    print(f"digits at {args.size}x{args.size}: {len(datasets['digits/train'])} training and {len(test_set)} test "
          f"images", flush=True)

    start = time.perf_counter()
    train_teacher(teacher, datasets["digits/train"], args.teacher_epochs or teacher_config["num_epochs"],
                  teacher_config["batch_size"], teacher_config["lr"])
    teacher_accuracy = accuracy(teacher, test_set, test_batch)
    teacher.eval()  # torchdistill's convention; the teacher's BNs use their running statistics

    box = DistillationBox(teacher, student, datasets, train_config, torch.device("cpu"), None, False, 1)
    distil(box, train_config["num_epochs"])
    print(f"teacher (resnet34) test accuracy {teacher_accuracy:.2f} %")
    print(f"student (resnet18 + OFD) test accuracy {accuracy(student, test_set, test_batch):.2f} %")
    print(f"taps: {box.teacher_model.resolved_taps}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
