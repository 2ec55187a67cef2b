"""Preprocessing throughput: photos decoded, resized and cropped per second, on 1 to N threads.

    python bench/preprocess.py                      # hymenoptera, Lite0's preprocessing, all core counts
    python bench/preprocess.py --threads 1,4,16

Every image /predict serves and every image a job decodes goes through
`workers.preprocessing.decode_square` (`imaging.decode_pixels`: TorchCodec, or Pillow with JPEG
draft scaling for big photos; torch's uint8 antialiased resize; center crop). On a GPU server
this is the CPU work behind each predicted image, so its rate over the machine's cores bounds
batch prediction over HTTP. The same run times Pillow's decode and bicubic resize in its place
(what Graft used before, and what an export's usage recipe does) as the reference, and prints
the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DEFAULT_DATASET  # noqa: E402

from workers.backbones import get_backbone  # noqa: E402
from workers.imaging import decode_image  # noqa: E402
from workers.preprocessing import decode_square  # noqa: E402


def pillow_square(data: bytes, pre) -> torch.Tensor:
    """The reference: Pillow's decode, bicubic resize and crop."""
    img = decode_image(data, draft_size=pre.resize_size)
    s = pre.resize_size
    scale = s / min(img.size)
    size = (max(s, round(img.width * scale)), max(s, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (size[0] - s) // 2, (size[1] - s) // 2
    return F.pil_to_tensor(img.crop((left, top, left + s, top + s)))


def rate(fn, images: list[bytes], threads: int, repeats: int) -> float:
    """Best of `repeats` passes over all images, in img/s."""
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(fn, images))
            best = min(best, time.perf_counter() - started)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    cores = os.cpu_count() or 1
    counts = sorted({1, 2, 4, 8, 16, 32, 64, cores} & set(range(1, cores + 1)))
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=counts)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in the server's request threads
    pre = get_backbone(args.backbone).preprocessing
    images = [p.read_bytes() for p in sorted(args.dataset.rglob("*.jpg"))]
    if not images:
        raise SystemExit(f"no .jpg files under {args.dataset}")
    rows = []
    for threads in args.threads:
        graft = rate(lambda d: decode_square(d, pre), images, threads, args.repeats)
        pillow = rate(lambda d: pillow_square(d, pre), images, threads, args.repeats)
        rows.append({"threads": threads, "graft_img_s": round(graft, 1), "pillow_resize_img_s": round(pillow, 1),
                     "ratio": round(graft / pillow, 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"images": len(images), "dataset": str(args.dataset), "resize_size": pre.resize_size,
                      "machine": f"{platform.machine()}, {cores} cores", "torch": torch.__version__,
                      "load_before": os.getloadavg(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
