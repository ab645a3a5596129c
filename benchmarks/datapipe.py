"""The data pipeline alone: images/s a DataLoader delivers, per worker and with the default workers.

    python -m benchmarks.datapipe                        # seefood512 (full-res JPEG) and CIFAR-10 (32 px) at 224 px
    python -m benchmarks.datapipe --sizes 128 224 --cifar-per-class 200
    python -m benchmarks.datapipe --photos 200 --batch-size 16 --models  # + 200 seefood512 photos at 12 MP

Every variant reads the training split with d2l's training transform (RandomResizedCrop + flip +
normalise) at the given size and yields float batches (32 images), as the model gets them:

- `project`: the project's dataset and transforms (PIL decode via `read_rgb`, a JPEG at the smallest DCT
  scale that `decode_side` allows, then the transforms on the uint8 tensor);
- `project, full decode`: the same with every JPEG decoded whole (the project before decode_side);
- `eval` and `eval, full decode`: the eval transform (resize, centre crop, normalise: validation, test,
  predict.py), the project's decode and the whole one;
- `PIL transforms`: the same decode, the transforms on the PIL image (the transform order before);
- `decode_jpeg`: torchvision.io.decode_jpeg (RGB) instead of PIL, tensor transforms;
- `PIL draft`: PIL's JPEG draft mode (DCT downscaling to at least the output size), tensor transforms;
- `batch resize` (tiny sources): the crop and flip at the source size per image, uint8 batches, then
  the resize to the output size and normalisation on the whole batch in the main process (its cost
  is inside the timing);
- `store`: `data.store=true` (`finetune.data.store`): the images decoded once (not timed here; its build
  time is printed), the project's transforms per image on the stored uint8 squares in the workers;
- `project, uint8 batches` and `store, uint8 batches`: the same crop and flip per image in the workers, which hand
  over uint8 images; the conversion to float and normalisation on the whole batch in the main process
  (`NormalizeBatch`, what a GPU does with `data.augment_on=auto` where it does not crop; its cost is inside the timing);
- `store, batch crop`: the stored squares with each sample's crop box and flip drawn in the workers, the
  crop, resize, flip and normalisation as one batch op in the main process (what a GPU does with
  `data.augment_on=auto`; on this CPU its cost is inside the timing).

For each source it first prints how far the eval transform's images move when the JPEGs are decoded at
`decode_side` instead of whole (mean and largest difference, in uint8 levels).

Against these, the model's training step rate at the same size on this CPU (ResNet-18 and
EfficientNet-Lite0, the same batch size, forward + backward + SGD step, channels-last off) says how many workers
keep it fed. Each rate is the median of `--rounds`, after one warm-up batch.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from benchmarks._common import DATASETS, benchmark_parser, machine, make_photos, median, table
from benchmarks.strategies import cifar10_subset
from finetune.data.datamodule import Transformed
from finetune.data.images import ImageFolder, read_rgb
from finetune.data.store import DeviceAugment, StoredCrops, StoredImages, collate_crops
from finetune.data.transforms import NormalizeBatch, decode_side, eval_transform, train_transform
from finetune.models import timm_backbone, torchvision_backbone
from finetune.models.backbones import IMAGENET_MEAN, IMAGENET_STD, InputConfig


class Decoded(Dataset):
    """`(transform(decode(path)), label)` for the files of an ImageFolder."""

    def __init__(self, folder: ImageFolder, decode: Callable, transform: Callable):
        self.samples, self.decode, self.transform = folder.samples, decode, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(self.decode(path)), label


def pil_transforms(size: int) -> v2.Compose:
    """d2l's training transform applied to the PIL image, then converted."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def decode_jpeg_rgb(path: Path) -> torch.Tensor:
    return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)


def pil_draft(size: int) -> Callable[[Path], Image.Image]:
    def decode(path: Path) -> Image.Image:
        with Image.open(path) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale if still >= size
            return image.convert("RGB")

    return decode


def eval_difference(folder: ImageFolder, config: InputConfig) -> tuple[float, float, float]:
    """How far the eval transform's images of `folder` move when each JPEG is decoded at `decode_side` instead of
    whole, in uint8 levels: the mean absolute difference, the share of values more than 8 levels off, the largest."""
    transform, decoded = eval_transform(config), folder.decoded_at_least(decode_side(config))
    std = torch.tensor(config.std).view(3, 1, 1) * 255
    total = beyond = largest = values = 0.0
    for index in range(len(folder)):  # one image at a time: CIFAR-10's 1,000 at 224 px would hold 600 MB
        difference = (transform(decoded[index][0]) - transform(folder[index][0])).abs() * std
        total, beyond = total + difference.sum().item(), beyond + (difference > 8).sum().item()
        largest, values = max(largest, difference.max().item()), values + difference.numel()
    return total / values, beyond / values, largest


def crop_at_source(source_size: int) -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(source_size, antialias=True), v2.RandomHorizontalFlip()])


def resize_batch(images: torch.Tensor, normalize: NormalizeBatch, size: int) -> torch.Tensor:
    """uint8 (B, 3, s, s) -> normalised float (B, 3, size, size), what the model side would do."""
    return normalize.images(F.interpolate(images.float().div_(255), size=(size, size), mode="bilinear"))


def loader_rate(
    dataset: Dataset, batch_size: int, workers: int, rounds: int, after: Callable | None = None, collate=None
) -> float:
    """Images/s delivered (median of rounds), after one warm-up batch per round; `after` makes the model's
    images of a batch in the main process."""
    rates = []
    for _ in range(rounds):
        loader = DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True, collate_fn=collate
        )
        count, start = 0, None
        for batch in loader:
            images = after(batch) if after is not None else batch[0]
            if start is None:
                start = time.perf_counter()
                continue
            count += len(images)
        rates.append(count / (time.perf_counter() - start))
    return median(rates)


def step_rate(name: str, size: int, batch_size: int, steps: int = 3) -> float:
    """Training images/s of the backbone + a linear head on random batches (what the loader must keep up with)."""
    backbone = (
        torchvision_backbone(name, pretrained=False)
        if name == "resnet18"
        else timm_backbone(name, pretrained=True, package_weights=True)
    )
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.num_features, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images, labels = torch.randn(batch_size, 3, size, size), torch.randint(10, (batch_size,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return batch_size / median(times[1:])


def variants(
    folder: ImageFolder, size: int, tiny_source: int | None, store_dir: Path
) -> dict[str, tuple[Dataset, Callable | None]]:
    config = InputConfig(size)
    project, evaluated = train_transform(config), eval_transform(config)
    start = time.perf_counter()
    stored = StoredImages.of(folder, None, config, store_dir)
    seconds = time.perf_counter() - start
    print(f"store of {len(stored)} images, short side {stored.side} px: {seconds:.1f} s", flush=True)
    everything = range(len(folder))
    device = DeviceAugment(config)
    uint8, normalize = train_transform(config, normalize=False), NormalizeBatch(config)

    def normalized(batch: list[torch.Tensor]) -> torch.Tensor:
        return normalize(batch)[0]

    training = folder.decoded_at_least(decode_side(config, "d2l"))  # as ImageFolderDataModule reads the splits
    found = {
        "project": (Transformed(training, everything, project), None),
        "project, full decode": (Decoded(folder, read_rgb, project), None),
        "eval": (Transformed(folder.decoded_at_least(decode_side(config)), everything, evaluated), None),
        "eval, full decode": (Decoded(folder, read_rgb, evaluated), None),
        "project, uint8 batches": (Transformed(training, everything, uint8), normalized),
        "PIL transforms": (Decoded(folder, read_rgb, pil_transforms(size)), None),
        "decode_jpeg": (Decoded(folder, decode_jpeg_rgb, project), None),
        "PIL draft": (Decoded(folder, pil_draft(size), project), None),
    }
    if tiny_source:
        crop = crop_at_source(tiny_source)
        found["batch resize"] = (Decoded(folder, read_rgb, crop), lambda batch: resize_batch(batch[0], normalize, size))
    found["store"] = (Transformed(stored, everything, project), None)
    found["store, uint8 batches"] = (Transformed(stored, everything, uint8), normalized)
    found["store, batch crop"] = (StoredCrops(stored, everything, config), lambda batch: device(batch)[0])
    return found


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = benchmark_parser(__doc__, overrides=None)
    parser.add_argument("--seefood", type=Path, default=DATASETS / "seefood512")
    parser.add_argument("--cifar", type=Path, default=DATASETS / "cifar10-jpg.tar.gz", help="the JPEG export archive")
    parser.add_argument("--cifar-per-class", type=int, default=100, help="training images per class to extract")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="the default: min(8, cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["resnet18", "tf_efficientnet_lite0"])
    parser.add_argument("--photos", type=int, default=0, help="+ this many seefood512 photos, enlarged")
    parser.add_argument("--photo-side", type=int, default=4032, help="their long side: 4032 x 3024 = 12 MP")
    args = parser.parse_args(argv)

    print(f"# Data pipeline, batches of {args.batch_size}: {machine()}\n", flush=True)
    sources = [("seefood512", args.seefood / "train", None)]
    if args.cifar.is_file() or args.cifar.is_dir():
        cifar = (
            args.cifar
            if args.cifar.is_dir()
            else cifar10_subset(args.cifar, Path("/tmp") / f"cifar10-{args.cifar_per_class}-0", args.cifar_per_class, 0)
        )
        sources.append(("cifar10 (32 px)", cifar / "train", 32))
    store_dir = Path(tempfile.mkdtemp(prefix="datapipe-store-"))
    if args.photos:
        size = (args.photo_side, args.photo_side * 3 // 4)  # a phone's 4:3
        make_photos(args.seefood, store_dir / "photos", {"train": args.photos}, size)
        sources.append((f"seefood512 at {size[0]}x{size[1]} px", store_dir / "photos" / "train", None))
    rows = []
    for size in args.sizes:
        for source, folder_path, tiny in sources:
            folder = ImageFolder(folder_path)
            mean, beyond, largest = eval_difference(folder, InputConfig(size))
            print(
                f"{source}, eval transform at {size} px, decode_side's decode against the whole: {mean:.2f} uint8 "
                f"levels on average, {100 * beyond:.3f} % of values more than 8 levels off, {largest:.0f} at most",
                flush=True,
            )
            for variant, (dataset, after) in variants(folder, size, tiny, store_dir).items():
                collate = collate_crops if isinstance(dataset, StoredCrops) else None
                per_worker = loader_rate(dataset, args.batch_size, 1, args.rounds, after, collate)
                default = loader_rate(dataset, args.batch_size, args.workers, args.rounds, after, collate)
                rows.append([source, size, variant, per_worker, default])
                print(rows[-1], flush=True)
    shutil.rmtree(store_dir)
    print(f"\nimages/s delivered (1 worker = per worker; {args.workers} workers = the default here)\n")
    print(table(["source", "size", "pipeline", "1 worker", f"{args.workers} workers"], rows))
    steps = [[name, size, step_rate(name, size, args.batch_size)] for name in args.models for size in args.sizes]
    if steps:
        print("\nthe model's training step rate on this CPU (images/s)\n")
        print(table(["model", "size", "images/s"], steps))
    return rows


if __name__ == "__main__":
    main()
