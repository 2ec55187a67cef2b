"""Training-step throughput: Graft's fine-tuning loop against a bare loop on the same backbone.

    python bench/train_throughput.py                    # Lite0, 224 px, batch 32, 256 images
    python bench/train_throughput.py --images 20000 --batch-size 256   # on a GPU

Both train the same network (backbone + new head) with AdamW on the same decoded uint8 images.
Graft's side is `workers.training.train` with `fine_tune` for `--epochs` epochs (`light`
augmentation of whole batches, BatchNorm statistics frozen unless `--bn-mode train`; on a GPU
the images live on the device, bf16 autocast, channels_last, fused AdamW). Its rate is counted
over the training steps of the last epoch (timestamps of the loop's own per-step progress calls;
the first epoch pays for kernel selection, as the bare loop's warm-up steps do; the clock waits
for the GPU only at that epoch's first and last step), and separately over the whole run. The
bare side feeds one pre-made batch in a loop (no augmentation, no data movement, bf16 +
channels_last + fused AdamW on a GPU): the ceiling for this backbone. Prints both and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch.nn import functional as F

from workers.artifacts import Classifier
from workers.backbones import get_backbone
from workers.config import TrainConfig
from workers.preprocessing import eval_crop, normalize
from workers.device import pick_device
from workers.training import PreparedData, train


class StepClock:
    """A training Control that times the last epoch's steps. The loop does not wait for the GPU
    between steps, so the clock does, only at the end of that epoch's first and last step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []  # perf_counter at the end of the last epoch's first and last step

    def stop_if_asked(self) -> None:
        pass

    def progress(self, update: dict) -> None:
        if "step" in update and update["epoch"] == update["epochs"] and update["step"] in (1, update["steps"]):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times.append(time.perf_counter())

    def last_epoch_rate(self, images: int, batch_size: int) -> float:
        """Images/s from the end of the last epoch's first step to the end of its last (which
        may be a partial batch)."""
        steps = -(-images // batch_size)
        return (images - batch_size) / (self.times[-1] - self.times[0]) if steps > 1 else float("nan")


def synthetic(pre, images: int, seed: int = 0) -> PreparedData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (images, 3, pre.resize_size, pre.resize_size), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 2, (images,), generator=gen)
    return PreparedData(["a", "b"], pre, x, y, x[:64], y[:64])


def bare_rate(spec, pre, batch_size: int, steps: int, device: torch.device) -> float:
    model = Classifier(spec.build_features(pretrained=True), spec.feature_dim, 2).to(
        device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = normalize(eval_crop(synthetic(pre, batch_size).train_x, pre).to(device), pre)
    y = torch.randint(0, 2, (batch_size,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # warm-up: kernels, allocator
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--bn-mode", default="frozen", choices=("frozen", "train"),
                        help="Graft's BatchNorm policy; the bare loop always uses batch statistics")
    args = parser.parse_args()
    device = pick_device()
    spec = get_backbone(args.backbone)
    pre = spec.preprocessing.at_size(args.image_size)
    data = synthetic(pre, args.images)
    config = TrainConfig(backbone=args.backbone, strategy="fine_tune", epochs=args.epochs, batch_size=args.batch_size,
                         image_size=args.image_size, augmentation="light", patience=None, bn_mode=args.bn_mode)
    clock = StepClock(device)
    result = train(config, data, spec.build_features(pretrained=True), spec.feature_dim, clock, device)
    graft = clock.last_epoch_rate(args.images, args.batch_size)
    bare = bare_rate(spec, pre, args.batch_size, max(3, args.images // args.batch_size), device)
    print(json.dumps({
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "images": args.images, "device": str(device),
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores",
        "epochs": args.epochs, "bn_mode": args.bn_mode, "graft_images_per_s": round(graft, 1),
        "graft_whole_run_images_per_s": result.metrics["train_images_per_s"],
        "bare_images_per_s": round(bare, 1), "ratio": round(graft / bare, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
