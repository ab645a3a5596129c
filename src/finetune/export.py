"""Export a classifier for serving: ONNX (for onnxruntime) or TorchScript, each with a JSON sidecar.

The exported graph maps normalised float images (N, 3, image_size, image_size), input `images`, to logits
(N, C), output `logits`; the batch size N is free. `<file>.json` beside it holds the rest a client needs:
the class names in label order, the eval transform (resize to a `resize` x `resize` square, centre-crop
`image_size`, normalise by `mean` and `std`, `interpolation`) and the `temperature` to divide logits by.

Classify a JPEG with onnxruntime, PIL and numpy only, as the project's eval transform does:

```python
import json, numpy as np, onnxruntime as ort
from PIL import Image
meta = json.load(open("model.onnx.json"))
size, resize = meta["image_size"], meta["resize"]
image = Image.open("photo.jpg").convert("RGB").resize((resize, resize), Image.Resampling[meta["interpolation"].upper()])
top = round((resize - size) / 2)  # centre crop, rounded as torchvision rounds it
x = (np.asarray(image.crop((top, top, top + size, top + size)), np.float32) / 255 - meta["mean"]) / meta["std"]
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
logits = session.run(None, {"images": x.transpose(2, 0, 1)[None].astype(np.float32)})[0][0] / meta["temperature"]
probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
print(meta["classes"][probs.argmax()], probs.max())
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.errors import MissingFileError

SIDECAR_KEYS = ("classes", "image_size", "resize", "mean", "std", "interpolation", "temperature")
INPUT, OUTPUT = "images", "logits"


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float  # between the exported file's logits and the PyTorch model's
    top1_agrees: bool  # on every input


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


def write_sidecar(meta: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """`<path>.json`: classes, image_size, resize, mean, std, interpolation, temperature as plain JSON types."""
    missing = [key for key in SIDECAR_KEYS if key not in meta]
    if missing:
        raise ValueError(f"meta lacks {', '.join(missing)} (needs {', '.join(SIDECAR_KEYS)})")
    data = {
        "classes": [str(name) for name in meta["classes"]],
        "image_size": int(meta["image_size"]),
        "resize": int(meta["resize"]),
        "mean": [float(v) for v in meta["mean"]],
        "std": [float(v) for v in meta["std"]],
        "interpolation": str(meta["interpolation"]),
        "temperature": float(meta["temperature"]),
    }
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


def check_parity(model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor) -> Parity:
    """Runs the exported file and the model (in eval mode) on the same `inputs` and compares their logits."""
    run = load_exported(path)
    with _eval_mode(model), torch.inference_mode():
        expected = model(inputs.to(next(model.parameters()).device)).float().cpu()
        got = run(inputs).float()
    return Parity(float((got - expected).abs().max()), bool((got.argmax(dim=1) == expected.argmax(dim=1)).all()))
