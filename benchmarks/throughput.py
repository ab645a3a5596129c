"""Training throughput of train.py's fit against a plain PyTorch loop (d2l style), measured in one process.

    python -m benchmarks.throughput                          # ResNet-18 and EfficientNet-Lite0, 128 and 224 px
    python -m benchmarks.throughput --models resnet18 --sizes 128 --steps 10 --rounds 3
    python -m benchmarks.throughput --accelerator gpu --models resnet18 --sizes 224 --batch-size 256 --data <folder>

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
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import lightning as L
import timm
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
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
    machine,
    median,
    table,
)
from finetune.builders import build, compose_config


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


def plain_loop(cfg: DictConfig, steps: int) -> StepClock:
    """d2l's training loop over the same data and transforms; the time after every optimizer step."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    datamodule.setup("fit")
    device = torch.device("cuda" if cfg.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")
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
    clock, loss_sum, correct = StepClock(), 0.0, 0
    for step, (images, labels) in enumerate(loader):
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
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        clock.tick()
    return clock


def measure(cfg: DictConfig, steps: int, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Images per wall second and per CPU second of each side, alternating which goes first."""
    batch_size = cfg.data.batch_size
    rates: dict[str, list[float]] = {"lightning": [], "plain": [], "lightning cpu": [], "plain cpu": []}
    for round_ in range(rounds):
        for side in ("lightning", "plain") if round_ % 2 == 0 else ("plain", "lightning"):
            if side == "lightning":
                clock = StepClock()
                fit(cfg, clock)
            else:
                clock = plain_loop(cfg, steps)
            rates[side].append(images_per_s(clock.times, warmup, batch_size))
            rates[f"{side} cpu"].append(images_per_s(clock.cpu, warmup, batch_size))
            gc.collect()  # the finished side's workers and tensors go now, not during the other's steps
    return rates


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = benchmark_parser(__doc__, "extra config overrides for both sides")
    add_speed_arguments(parser, sizes=[128, 224], steps=12, rounds=3)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="where both sides train")
    parser.add_argument("--dry-run", action="store_true", help="compose every config, measure nothing")
    args = parser.parse_args(argv)

    print(f"# Throughput, train.py fit vs plain loop: {machine()}\n")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for size in args.sizes:
                steps = args.warmup + args.steps
                cfg = compose_config(
                    overrides(args.data, model, size, args.batch_size, steps, args.overrides, args.accelerator),
                    Path(tmp),
                )
                if args.dry_run:
                    print(f"{model} {size}px: the config composes", flush=True)
                    continue
                rates = measure(cfg, steps, args.warmup, args.rounds)
                med = {side: median(values) for side, values in rates.items()}
                results.append(
                    {
                        "model": model,
                        "size": size,
                        "lightning": med["lightning"],
                        "plain": med["plain"],
                        "ratio": med["lightning"] / med["plain"],
                        "rounds": " ".join(
                            f"{a / b:.2f}" for a, b in zip(rates["lightning"], rates["plain"], strict=True)
                        ),
                        "CPU-time ratio": med["lightning cpu"] / med["plain cpu"],
                        "CPU ms/step more": 1000 * args.batch_size * (1 / med["lightning cpu"] - 1 / med["plain cpu"]),
                    }
                )
                print(f"{model} {size}px: {rates}", flush=True)
    if args.dry_run:
        return results
    headers = ["model", "size", "lightning", "plain", "ratio", "rounds", "CPU-time ratio", "CPU ms/step more"]
    print(
        "\nimages/s (median of rounds); ratio = train.py / plain loop, per round in `rounds`; the same ratio of "
        "images per CPU second of the main process, and the CPU time train.py spends more per step\n"
    )
    print(table(headers, [[r[h] for h in headers] for r in results]))
    return results


if __name__ == "__main__":
    main()
