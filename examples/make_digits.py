"""Write a few of scikit-learn's 8x8 digits as PNG files (examples/digits/<index>-<label>.png) to try Predict on.

    python -m examples.make_digits [--count 10] [--out examples/digits]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "digits")
    args = p.parse_args(argv)
    digits = load_digits()
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.count):
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        Image.fromarray(pixels).save(args.out / f"{i:03d}-{digits.target[i]}.png")
    print(f"wrote {args.count} digits to {args.out}")


if __name__ == "__main__":
    main()
