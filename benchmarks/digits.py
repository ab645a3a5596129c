"""A data set far from ImageNet's photos: hand-written digits (8x8 grey levels, 10 classes) as an image folder, and
the strategy comparison on it: does fine-tuning still pay when the target data differ greatly from the source?

    pip install -e ".[far]"                                   # scikit-learn, which ships the data
    python -m benchmarks.digits                               # writes data/digits, then runs compare.py on it
    python -m benchmarks.digits --only-write --out /tmp/digits

Source: the "Optical Recognition of Handwritten Digits" data set of the UCI Machine Learning Repository (E. Alpaydin,
C. Kaynak, 1998; https://archive.ics.uci.edu/dataset/80), licensed CC BY 4.0; its test part (1,797 images of 8x8
pixels, 0-16 grey levels) is shipped inside scikit-learn (BSD-3-Clause) as `sklearn.datasets.load_digits`, so it
needs no network. Nothing here is like an ImageNet photo: no colour, no texture, 64 pixels of pen strokes.
The images are written outside the repository (data/ is ignored by git) and never committed: each digit scaled
to 32x32 (bilinear), grey levels to 0-255, RGB; a stratified, seeded 80/20 train/test split.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks._common import ROOT, benchmark_parser

SIZE = 32


def write_digits(out: Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """data/digits/{train,test}/<digit>/<index>.png from scikit-learn's copy; kept when complete."""
    done = out / ".complete"
    if done.exists():
        return out
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as err:
        raise SystemExit('benchmarks/digits.py needs scikit-learn: pip install -e ".[far]"') from err
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        members = np.flatnonzero(digits.target == label)
        rng.shuffle(members)
        cut = round(len(members) * test_fraction)
        for split, chosen in (("test", members[:cut]), ("train", members[cut:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
                image.save(folder / f"{index:04d}.png")
    done.touch()
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = benchmark_parser(__doc__, "extra compare.py overrides")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "digits")
    parser.add_argument("--only-write", action="store_true", help="write the image folder, compare nothing")
    parser.add_argument("--shots", default="all", help="compare.shots, e.g. 10,all")
    args = parser.parse_args(argv)
    root = write_digits(args.out.resolve())
    print(f"Digits written to {root}")
    if not args.only_write:
        command = [
            sys.executable,
            "compare.py",
            "model=efficientnet_lite0",
            "data=imagefolder",
            f"data.root={root}",
            "data.image_size=64",
            "data.num_workers=1",
            "~callbacks.progress_bar",
            "~callbacks.model_summary",
            "compare.strategies=[freeze,finetune,freeze_unfreeze,gradual,llrd,scratch]",
            f"compare.shots=[{args.shots}]",
            *args.overrides,
        ]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return root


if __name__ == "__main__":
    main()
