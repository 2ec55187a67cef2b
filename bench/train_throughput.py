"""Training-step throughput: Graft's fine-tuning loop against a bare loop on the same backbone.

    python bench/train_throughput.py                    # Lite0, 224 px, batch 32, 256 images
    python bench/train_throughput.py --images 20000 --batch-size 256   # on a GPU

Both train the same network (backbone + new head) with AdamW on the same decoded uint8 images.
Graft's side is `workers.training.train` with `fine_tune` for one epoch (per-sample `light`
augmentation, BatchNorm statistics frozen, bf16 + channels_last on a GPU); the bare side feeds
one pre-made batch in a loop (no augmentation, no data movement): the ceiling for this backbone.
Prints images/s of each and their ratio.
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
from workers.training import PreparedData, pick_device, train


class Quiet:
    def checkpoint(self) -> None:
        pass

    def progress(self, update: dict) -> None:
        pass


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
    args = parser.parse_args()
    device = pick_device()
    spec = get_backbone(args.backbone)
    pre = spec.preprocessing.at_size(args.image_size)
    data = synthetic(pre, args.images)
    config = TrainConfig(backbone=args.backbone, strategy="fine_tune", epochs=1, batch_size=args.batch_size,
                         image_size=args.image_size, augmentation="light")
    result = train(config, data, spec.build_features(pretrained=True), spec.feature_dim, Quiet(), device)
    graft = result.metrics["train_images_per_s"]
    bare = bare_rate(spec, pre, args.batch_size, max(3, args.images // args.batch_size), device)
    print(json.dumps({
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "images": args.images, "device": str(device),
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores",
        "graft_images_per_s": graft, "bare_images_per_s": round(bare, 1), "ratio": round(graft / bare, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
