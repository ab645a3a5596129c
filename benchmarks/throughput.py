"""Training throughput of train.py's fit against a plain PyTorch loop (d2l style), measured in one process.

    python -m benchmarks.throughput                          # ResNet-18 and EfficientNet-Lite0, 128 and 224 px
    python -m benchmarks.throughput --models resnet18 --sizes 128 --steps 10 --rounds 3
    python -m benchmarks.throughput --accelerator gpu --models resnet18 --sizes 224 --batch-size 256 --data <folder>
    python -m benchmarks.throughput --variants ceiling plain fit store ...   # the data paths against the ceiling

Both sides train the same architecture with the same weights, data, transforms, batch size, workers and
optimizer: the fit is built by `finetune.train.build` with the Trainer, callbacks and loggers of the
config (progress bar off; `strategy=finetune`, as the recipe trains after its head-only first epoch, with
its per-step schedule, label smoothing and param groups); the plain loop is what d2l's `train_batch_ch13`
does on the library's model (`torchvision`/`timm` with a new classifier): zero_grad, forward, loss, backward, step, and the running
loss and accuracy. Images/s count the optimizer steps after `--warmup` steps. The two alternate, in
turn first, for `--rounds` rounds, so load from other jobs falls on both; the ratio is of the medians.
The same ratio in CPU time of the main process hardly depends on that load. With `--accelerator gpu` both
sides train on the GPU (`trainer.precision=16-mixed` or `bf16-mixed` as extra overrides: autocast on both,
fp16 with a gradient scaler); `--dry-run` only composes each config.

`--variants` picks the sides (default: fit and plain, as above): `ceiling` is the plain loop on a few batches
already on the device, cycled (no loader: the model's own speed), `plain` the plain loop with the loader, `fit`
train.py's fit with the config's data path and `store` its fit with `data.store=true` (images decoded once; on a
GPU the crop, flip and normalisation then run on the device). On a GPU each side's mean utilisation over its
timed steps (NVML, as nvidia-smi reads it) is reported too. `--profile-below N`: a model whose fastest fit is
under N images/s gets a torch.profiler table of a few of that fit's steps (top CUDA and CPU ops).
"""

from __future__ import annotations

import copy
import gc
import tempfile
import warnings
from pathlib import Path

import lightning as L
import timm
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from benchmarks._common import (
    EVERY_WEIGHT_TRAINS,
    MODELS,
    QUIET,
    StepClock,
    add_speed_arguments,
    benchmark_parser,
    fit,
    images_per_s,
    in_turn,
    machine,
    mean,
    median,
    table,
)
from finetune.builders import build
from finetune.config import compose_config

# Each side, in the order they are listed: the model's own speed, then the loops with the data path
VARIANTS = {
    "ceiling": "plain loop on batches already on the device",
    "plain": "plain loop with the loader",
    "fit": "train.py's fit",
    "store": "train.py's fit with data.store=true",
}
# (numerator, denominator): the ratios shown when both sides ran
RATIOS = [("fit", "plain"), ("store", "ceiling"), ("store", "plain"), ("fit", "ceiling")]
GOALS = RATIOS[:2]  # the ratios that should be near 1 (their values per round are shown too)


def overrides(
    data: Path, model: str, size: int, batch_size: int, steps: int, extra: list[str], accelerator: str = "cpu"
) -> list[str]:
    return [
        "data=imagefolder",
        f"data.root={data}",
        f"data.image_size={size}",
        f"data.batch_size={batch_size}",
        *MODELS[model],
        *EVERY_WEIGHT_TRAINS,
        *QUIET,
        f"trainer.accelerator={accelerator}",
        "trainer.max_epochs=1",
        f"++trainer.limit_train_batches={steps}",
        "++trainer.limit_val_batches=0",
        "++trainer.num_sanity_val_steps=0",
        *extra,
    ]


def plain_model(cfg: DictConfig, module: nn.Module) -> nn.Module:
    """The library's classifier with `module`'s weights (same tensors in the same order), as d2l builds it."""
    num_classes = module.head.out_features
    if "torchvision" in cfg.model.backbone._target_:
        net = torchvision.models.get_model(cfg.model.name, num_classes=num_classes)
    else:
        net = timm.create_model(cfg.model.name, num_classes=num_classes)
    theirs, ours = net.state_dict(), module.state_dict()
    pairs = list(zip(theirs.items(), ours.values(), strict=True))
    if any(mine.shape != tensor.shape for (_, tensor), mine in pairs):
        raise ValueError(f"{cfg.model.name}: the library model's tensors do not line up with the module's")
    net.load_state_dict({name: mine for (name, _), mine in pairs})
    if cfg.model.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def plain_loop(cfg: DictConfig, steps: int, warmup: int, resident: int = 0) -> StepClock:
    """d2l's training loop over the same data and transforms; the time after every optimizer step. `resident`:
    that many batches are taken from the loader first, moved to the device and cycled (no loader in the loop).
    The running loss and accuracy stay on the device (d2l reads them each step: on a GPU the host would wait for
    every step before queueing the next, and the loop would not be the model's own speed)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    datamodule.setup("fit")
    device = torch.device("cuda" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    # as the fit's Trainer sets it (for the whole process: the sides alternate in this one)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark"))
    net = plain_model(cfg, module).to(device)
    head = net.get_classifier() if hasattr(net, "get_classifier") else net.fc
    head_ids = {id(p) for p in head.parameters()}
    groups = [
        {"params": [p for p in net.parameters() if id(p) not in head_ids], "lr_mult": 1.0},
        {"params": list(head.parameters()), "lr_mult": cfg.strategy.head_lr_mult},
    ]
    settings = {k: v for k, v in cfg.optimizer.items() if k != "filter_bias_and_bn"}  # d2l decays every weight
    optimizer = instantiate(settings)(groups)
    for group in optimizer.param_groups:
        group["lr"] *= group["lr_mult"]
    loader = DataLoader(
        datamodule.datasets["train"],
        batch_size=datamodule.batch_size,
        shuffle=True,
        num_workers=datamodule.num_workers,
        persistent_workers=datamodule.persistent_workers,
        pin_memory=datamodule.pin_memory,
    )
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(cfg.trainer.precision))
    autocast = torch.autocast(device.type, dtype or torch.bfloat16, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    net.train()
    batches = loader
    if resident:
        batches = []
        for images, labels in loader:
            batches.append((images.to(device), labels.to(device)))
            if len(batches) == resident:
                break
        batches = [batches[step % len(batches)] for step in range(steps)]
        del loader
    clock = WindowClock(warmup, steps)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    for step, (images, labels) in enumerate(batches):
        if step == steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        with autocast:
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        clock.tick()
    return clock


class WindowClock(StepClock):
    """A clock that waits for the GPU only where the timed window starts and ends (see `images_per_s`), and counts
    the times the host waited for the GPU in between (`waits`: CUDA's sync debug mode warns at each such call)."""

    def __init__(self, warmup: int, steps: int) -> None:
        super().__init__(synchronize_at={warmup - 1, steps - 1})
        self.window = (warmup - 1, steps - 1)
        self.waits: int | None = None
        self._counting: warnings.catch_warnings | None = None
        self._warned: list[warnings.WarningMessage] = []

    def tick(self) -> None:
        step = len(self.times)
        if step == self.window[1] and self._counting is not None:  # before the clock's own wait
            torch.cuda.set_sync_debug_mode(0)
            self._counting.__exit__(None, None, None)
            self.waits = sum("synchronizing CUDA operation" in str(w.message) for w in self._warned)
            self._counting = None
        super().tick()
        if step == self.window[0] and torch.cuda.is_initialized():
            self._counting = warnings.catch_warnings(record=True)
            self._warned = self._counting.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")


def run_side(side: str, cfgs: dict[str, DictConfig], steps: int, warmup: int) -> StepClock:
    """One timed run of a side (`VARIANTS`)."""
    if side == "ceiling":
        return plain_loop(cfgs["plain"], steps, warmup, resident=min(steps, 4))
    if side == "plain":
        return plain_loop(cfgs["plain"], steps, warmup)
    clock = WindowClock(warmup, steps)
    fit(cfgs[side], clock)
    return clock


def measure(
    cfgs: dict[str, DictConfig], steps: int, warmup: int, rounds: int, variants: tuple[str, ...] = ("fit", "plain")
) -> dict[str, list[float]]:
    """Images per wall second and per CPU second of each side (and the GPU's mean utilisation over its timed steps,
    where there is one), the order of the sides turning each round."""
    batch_size = cfgs["plain"].data.batch_size
    rates: dict[str, list[float]] = {}
    for round_ in range(rounds):
        for side in in_turn(variants, round_):
            clock = run_side(side, cfgs, steps, warmup)
            rates.setdefault(side, []).append(images_per_s(clock.times, warmup, batch_size))
            rates.setdefault(f"{side} cpu", []).append(images_per_s(clock.cpu, warmup, batch_size))
            if clock.gpu[warmup:]:
                rates.setdefault(f"{side} gpu", []).append(mean(clock.gpu[warmup:]))
            if clock.waits is not None:
                rates.setdefault(f"{side} waits", []).append(clock.waits / (len(clock.times) - warmup))
            del clock
            gc.collect()  # the finished side's workers and tensors go now, not during the other's steps
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rates


class Profiled(L.Callback):
    """torch.profiler over `steps` training steps from step `start`; prints the top ops by device and CPU time."""

    def __init__(self, start: int, steps: int, rows: int = 15) -> None:
        self.start, self.steps, self.rows = start, steps, rows
        self.profiler: profile | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: object, index: int) -> None:
        if index == self.start:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        if self.profiler is not None and args[-1] == self.start + self.steps - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            for key in ("self_device_time_total", "self_cpu_time_total", "cpu_time_total"):
                if key != "self_device_time_total" or torch.cuda.is_available():
                    print(f"\nTop ops of {self.steps} steps by {key}:\n", flush=True)
                    print(averages.table(sort_by=key, row_limit=self.rows), flush=True)
            self.profiler = None


def profile_fit(cfg: DictConfig, warmup: int, steps: int) -> None:
    """A few of the fit's steps (after `warmup`) under torch.profiler: where the time goes."""
    cfg = copy.deepcopy(cfg)
    cfg.trainer.limit_train_batches = warmup + steps
    fit(cfg, Profiled(warmup, steps))


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = benchmark_parser(__doc__, "extra config overrides for both sides")
    add_speed_arguments(parser, sizes=[128, 224], steps=12, rounds=3)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="where both sides train")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=["fit", "plain"], help="the sides measured"
    )
    parser.add_argument(
        "--profile-below", type=float, default=0, help="profile a model's fit if none of its fits reaches this rate"
    )
    parser.add_argument("--profile-models", nargs="+", choices=list(MODELS), help="only these (default: all)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="compose every config, measure nothing")
    args = parser.parse_args(argv)
    variants = tuple(side for side in VARIANTS if side in args.variants)

    print(f"# Throughput, train.py fit vs plain loop: {machine()}\n")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for size in args.sizes:
                steps = args.warmup + args.steps
                base = overrides(args.data, model, size, args.batch_size, steps, args.overrides, args.accelerator)
                cfgs = {"plain": compose_config(base, Path(tmp))}
                cfgs["fit"] = cfgs["plain"]
                if "store" in variants:
                    cfgs["store"] = compose_config([*base, "data.store=true"], Path(tmp))
                if args.dry_run:
                    print(f"{model} {size}px: the config composes", flush=True)
                    continue
                rates = measure(cfgs, steps, args.warmup, args.rounds, variants)
                print(f"{model} {size}px: {rates}", flush=True)
                results.append(summary(model, size, rates, args.batch_size, variants))
                fits = [side for side in ("store", "fit") if side in variants]
                profiled = args.profile_models is None or model in args.profile_models
                if fits and profiled and max(results[-1][side] for side in fits) < args.profile_below:
                    print(f"\n{model} {size}px: under {args.profile_below:.0f} images/s, profiled ({fits[0]}):")
                    try:  # the measurements above are kept whatever happens here
                        profile_fit(cfgs[fits[0]], args.warmup, args.profile_steps)
                    except Exception as err:
                        print(f"The profile failed: {type(err).__name__}: {err}", flush=True)
    if args.dry_run:
        return results
    if variants == ("plain", "fit"):
        headers = ["model", "size", "lightning", "plain", "ratio", "rounds", "CPU-time ratio", "CPU ms/step more"]
        headers += [h for h in ("GPU %", "host waits/step") if any(h in result for result in results)]
        print(
            "\nimages/s (median of rounds); ratio = train.py / plain loop, per round in `rounds`; the same ratio of "
            "images per CPU second of the main process, and the CPU time train.py spends more per step\n"
        )
    else:
        ratios = [f"{a}/{b}" for a, b in RATIOS if a in variants and b in variants]
        gpu = [h for h in ("GPU %", "host waits/step") if any(h in result for result in results)]
        headers = ["model", "size", *variants, *ratios, "rounds", *gpu]
        print(
            "\nimages/s (median of rounds): "
            + "; ".join(f"{side} = {VARIANTS[side]}" for side in variants)
            + f"; the goal ratios per round in `rounds`{'; GPU % = mean utilisation of each side, same order' if gpu else ''}"
            + ("; host waits/step = times the host waited for the GPU per timed step, same order\n" if gpu else "\n")
        )
    print(table(headers, [[r.get(h) for h in headers] for r in results]))
    return results


def summary(
    model: str, size: int, rates: dict[str, list[float]], batch_size: int, variants: tuple[str, ...]
) -> dict[str, object]:
    """One row of the table: each side's median images/s, the ratios of sides (per round too), GPU utilisation."""
    med = {side: median(values) for side, values in rates.items()}
    row: dict[str, object] = {"model": model, "size": size, **{side: med[side] for side in VARIANTS if side in med}}
    rounds = []
    for a, b in RATIOS:
        if a in med and b in med:
            row[f"{a}/{b}"] = med[a] / med[b]
            if (a, b) not in GOALS:
                continue
            per_round = " ".join(f"{x / y:.2f}" for x, y in zip(rates[a], rates[b], strict=True))
            rounds.append(per_round if variants == ("plain", "fit") else f"{a}/{b} {per_round}")
    if "fit" in med and "plain" in med:  # the names and columns of the fit-vs-plain table
        row["lightning"], row["ratio"] = med["fit"], med["fit"] / med["plain"]
        row["CPU-time ratio"] = med["fit cpu"] / med["plain cpu"]
        row["CPU ms/step more"] = 1000 * batch_size * (1 / med["fit cpu"] - 1 / med["plain cpu"])
    row["rounds"] = "; ".join(rounds)
    gpu = [f"{med[f'{side} gpu']:.0f}" for side in VARIANTS if f"{side} gpu" in med]
    if gpu:
        row["GPU %"] = " / ".join(gpu)
    waits = [f"{med[f'{side} waits']:.2f}" for side in VARIANTS if f"{side} waits" in med]
    if waits:
        row["host waits/step"] = " / ".join(waits)
    return row


if __name__ == "__main__":
    main()
