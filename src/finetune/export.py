"""Export a classifier for serving: ONNX (for onnxruntime) or TorchScript, each with a JSON sidecar.

`python export.py ckpt_path=<run>/checkpoints/last.ckpt format=onnx|torchscript` exports a checkpoint (`main`);
a LoRA checkpoint (`peft=lora`) is exported with its updates merged into the weights it adapts, and its parity
checked against the adapted model.
The exported graph maps normalised float images (N, 3, image_size, image_size), input `images`, to logits
(N, C), output `logits`; the batch size N is free. `<file>.json` beside it holds the rest a client needs:
the class names in label order, the eval transform (`InputConfig.to_dict`: the short side resized to `resize`
with `interpolation`, the centre crop `image_size`, normalised by `mean` and `std`) and the `temperature` to
divide logits by; a multi-label model's also `multilabel: true` and `thresholds`, one per class: an image has the
classes whose sigmoid(logits / temperature) is at least their threshold (not the softmax below).

Classify a JPEG with onnxruntime, PIL and numpy only, as the project's eval transform does:

```python
import json, numpy as np, onnxruntime as ort
from PIL import Image, ImageOps

meta = json.load(open("model.onnx.json"))
image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")
(w, h), short, size = image.size, meta["resize"], meta["image_size"]
w, h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # as torchvision's Resize(short)
image = image.resize((w, h), Image.Resampling[meta["interpolation"].upper()])
left, top = round((w - size) / 2), round((h - size) / 2)  # the centre crop, rounded as torchvision rounds it
x = (np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255 - meta["mean"]) / meta["std"]
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
logits = session.run(None, {"images": x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0] / meta["temperature"]
print(meta["classes"][logits.argmax()], 1 / np.exp(logits - logits.max()).sum())  # top-1 class and probability
```
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from finetune.builders import rebuild
from finetune.checkpoint import checkpoint_file
from finetune.config import CONFIG_DIR
from finetune.data.datamodule import ImageFolderDataModule
from finetune.data.transforms import eval_transform
from finetune.errors import ConfigError, MissingFileError, UserError, exit_on_user_error
from finetune.models.backbones import InputConfig
from finetune.models.parameter_efficient import merged

log = logging.getLogger(__name__)

SIDECAR_KEYS = ("classes", "image_size", "mean", "std", "crop_pct", "interpolation", "temperature")
INPUT, OUTPUT = "images", "logits"


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float  # between the exported file's logits and the PyTorch model's
    top1_agrees: bool  # on every input
    labels_agree: bool | None = None  # multi-label: the same classes above the thresholds on every input


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


def write_sidecar(meta: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """`<path>.json`: the classes, `InputConfig.to_dict()` of `meta` (image_size, mean, std, crop_pct,
    interpolation, resize) and the temperature, as plain JSON types; a multi-label model's `multilabel: true` and
    a threshold per class (an image has a class when sigmoid(logits / temperature) is at least its threshold)."""
    missing = [key for key in SIDECAR_KEYS if key not in meta]
    if missing:
        raise ValueError(f"meta lacks {', '.join(missing)} (needs {', '.join(SIDECAR_KEYS)})")
    data = {
        "classes": [str(name) for name in meta["classes"]],
        **InputConfig.from_dict(meta).to_dict(),
        "temperature": float(meta["temperature"]),
    }
    if meta.get("multilabel"):
        data |= {"multilabel": True, "thresholds": [float(t) for t in meta["thresholds"]]}
    target = sidecar_path(path)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata written beside an exported file (`path` is the exported file, not the JSON)."""
    source = sidecar_path(path)
    if not source.is_file():
        raise MissingFileError(f"No metadata for {path}: expected {source} beside it (written by the export)")
    return json.loads(source.read_text())


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (BatchNorm running statistics, no dropout) for the duration, then the model's mode as it was."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def _example(model: nn.Module, meta: Mapping[str, Any]) -> torch.Tensor:
    """Two images: torch.export specialises a dimension of size 1, so a batch of one would fix the batch size."""
    device = next(model.parameters()).device
    size = int(meta["image_size"])
    return torch.randn(2, 3, size, size, device=device)


def export_onnx(model: nn.Module, meta: Mapping[str, Any], path: str | os.PathLike, opset: int | None = None) -> Path:
    """ONNX via torch.export (the dynamo exporter) with a dynamic batch axis, weights inside the one file
    (under ONNX's 2 GB limit), and its sidecar; `opset` None: the exporter's recommended opset."""
    path = Path(path)
    with _eval_mode(model):
        torch.onnx.export(
            model,
            (_example(model, meta),),
            path,
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    write_sidecar(meta, path)
    return path


def export_torchscript(model: nn.Module, meta: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """TorchScript by tracing (in eval mode, without autograd) and its sidecar; a traced conv net takes any batch
    size. Tracing's own check (a second trace) is skipped: `check_parity` compares what matters, the logits."""
    path = Path(path)
    with _eval_mode(model), torch.no_grad():
        traced = torch.jit.trace(model, _example(model, meta), check_trace=False)
    traced.save(str(path))
    write_sidecar(meta, path)
    return path


def load_exported(path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> logits on the CPU by the exported file: onnxruntime for `.onnx`, else `torch.jit.load`."""
    if not Path(path).is_file():
        raise MissingFileError(f"No such exported model: {path}")
    if Path(path).suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: torch.from_numpy(session.run(None, {INPUT: images.cpu().numpy()})[0])
    module = torch.jit.load(str(path), map_location="cpu")
    return lambda images: module(images.cpu())


def check_parity(
    model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor, thresholds: list[float] | None = None
) -> Parity:
    """Runs the exported file and the model (in eval mode) on the same `inputs` and compares their logits, and with
    `thresholds` (multi-label) the classes whose sigmoid is at least its threshold."""
    run = load_exported(path)
    with _eval_mode(model), torch.inference_mode():
        expected = model(inputs.to(next(model.parameters()).device)).float().cpu()
        got = run(inputs).float()
    top1 = bool((got.argmax(dim=1) == expected.argmax(dim=1)).all())
    if thresholds is None:
        return Parity(float((got - expected).abs().max()), top1)
    above = [logits.sigmoid() >= torch.tensor(thresholds) for logits in (got, expected)]
    return Parity(float((got - expected).abs().max()), top1, bool(torch.equal(*above)))


FORMATS = {"onnx": (".onnx", export_onnx), "torchscript": (".pt", export_torchscript)}


def parity_inputs(datamodule: ImageFolderDataModule, config: InputConfig, count: int = 8) -> tuple[torch.Tensor, str]:
    """Up to `count` images spread over the run's test split (so over its classes) as the model takes them, or
    random inputs if the split cannot be read here; with a description."""
    try:
        test = datamodule.read_split("test")
    except (UserError, OSError) as err:
        log.warning("The test split cannot be read (%s): checking parity on random inputs", err)
        return torch.randn(count, 3, config.image_size, config.image_size), f"{count} random inputs"
    transform = eval_transform(config)
    picks = range(0, len(test), math.ceil(len(test) / count))
    return torch.stack([transform(test[i][0]) for i in picks]), f"{len(picks)} test images"


def export_checkpoint(cfg: DictConfig) -> tuple[Path, Parity]:
    """`export.py`: the checkpoint's model to `format` with its sidecar, then its logits compared with PyTorch's."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: unknown, expected one of {', '.join(FORMATS)}")
    suffix, exporter = FORMATS[cfg.format]
    for name in ("onnx_ir", "onnxscript"):  # a line per optimisation pass otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    datamodule, model = rebuild(checkpoint_file(cfg.ckpt_path), [])
    path = Path(cfg.output) if cfg.output else Path(cfg.paths.output_dir) / f"model{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    exporter(merged(model.network()), model.meta, path)  # LoRA's updates in the weights: a plain network
    print(f"Exported {path} and its sidecar {sidecar_path(path).name} in {time.perf_counter() - start:.1f} s")
    inputs, source = parity_inputs(datamodule, model.input_config)
    parity = check_parity(model, path, inputs, model.meta.get("thresholds"))
    agrees = parity.top1_agrees if parity.labels_agree is None else parity.labels_agree
    decision = "top-1" if parity.labels_agree is None else "labels above the thresholds"
    same = "the same" if agrees else "DIFFERENT"
    print(f"Parity with PyTorch on {source}: max |logit difference| {parity.max_abs_diff:.1e}, {decision} {same}")
    return path, parity


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)  # and asked for
    exit_on_user_error(export_checkpoint, cfg)
