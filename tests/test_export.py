"""ONNX and TorchScript export: sidecar, parity with the PyTorch model at any batch size, the README snippet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finetune import export
from finetune.config import PROJECT_ROOT
from finetune.data.images import IMAGE_EXTENSIONS, read_rgb
from finetune.data.transforms import eval_transform
from finetune.errors import MissingFileError
from finetune.models import InputConfig
from finetune.models.backbones import timm_backbone, timm_input_config
from tests.helpers import tiny_classifier, tiny_meta

HOTDOG_TEST = PROJECT_ROOT.parent / "shared" / "datasets" / "hotdog64" / "test"
EXPORTERS = {"onnx": export.export_onnx, "pt": export.export_torchscript}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated, and asked for


@pytest.fixture(scope="module")
def efficientnet() -> tuple[nn.Module, dict]:
    """EfficientNet-Lite0 (offline ImageNet weights) + a linear head at 64 px, as the training module holds it:
    backbone weights channels_last, the first two stages frozen (they run under torch.no_grad())."""
    torch.manual_seed(0)
    backbone = timm_backbone("tf_efficientnet_lite0", pretrained=True, package_weights=True)
    backbone.frozen_stages = 2
    backbone.to(memory_format=torch.channels_last)
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 2))
    config = timm_input_config("tf_efficientnet_lite0").overridden(image_size=64)
    return model, {"classes": ["hotdog", "not-hotdog"], **config.to_dict(), "temperature": 1.3}


@pytest.fixture(scope="module")
def efficientnet_exports(efficientnet, tmp_path_factory) -> dict[str, Path]:
    model, meta = efficientnet
    folder = tmp_path_factory.mktemp("export")
    return {suffix: exporter(model, meta, folder / f"model.{suffix}") for suffix, exporter in EXPORTERS.items()}


@pytest.mark.parametrize("suffix", EXPORTERS)
def test_tiny_model_export_writes_its_sidecar_and_matches_at_any_batch_size(suffix, tmp_path):
    model, meta = tiny_classifier().train(), tiny_meta(temperature=1.7)
    path = EXPORTERS[suffix](model, meta, tmp_path / f"model.{suffix}")
    assert model.training  # exported in eval mode, then given back in the mode it was in
    assert export.read_sidecar(path) == {**meta, "mean": list(meta["mean"]), "std": list(meta["std"])}
    assert json.loads((tmp_path / f"model.{suffix}.json").read_text())["temperature"] == 1.7
    torch.manual_seed(1)
    for batch in (1, 3):
        inputs = torch.randn(batch, 3, 32, 32)
        parity = export.check_parity(model, path, inputs)
        assert parity.max_abs_diff < 1e-5 and parity.top1_agrees, (batch, parity)
        with torch.no_grad():  # what eval mode gives, not train mode's batch statistics
            assert torch.allclose(export.load_exported(path)(inputs), model.eval()(inputs), atol=1e-5)
        model.train()


@pytest.mark.parametrize("suffix", EXPORTERS)
def test_efficientnet_export_matches_pytorch_within_1e_4(efficientnet, efficientnet_exports, suffix):
    model, _ = efficientnet
    torch.manual_seed(2)
    for batch in (1, 3):
        parity = export.check_parity(model, efficientnet_exports[suffix], torch.randn(batch, 3, 64, 64))
        assert parity.max_abs_diff < 1e-4 and parity.top1_agrees, (batch, parity)


@pytest.mark.skipif(not HOTDOG_TEST.is_dir(), reason=f"{HOTDOG_TEST} is not there")
@pytest.mark.parametrize("suffix", EXPORTERS)
def test_efficientnet_export_matches_pytorch_on_real_photos(efficientnet, efficientnet_exports, suffix):
    model, meta = efficientnet
    transform = eval_transform(InputConfig.from_dict(meta))
    files = [
        path
        for folder in sorted(HOTDOG_TEST.iterdir())
        for path in sorted(folder.iterdir())[:3]
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    assert len(files) >= 4
    inputs = torch.stack([transform(read_rgb(path)) for path in files])
    parity = export.check_parity(model, efficientnet_exports[suffix], inputs)
    assert parity.max_abs_diff < 1e-4 and parity.top1_agrees, parity


def test_missing_sidecar_or_file_is_named(tmp_path):
    with pytest.raises(MissingFileError, match=r"model\.onnx\.json"):
        export.read_sidecar(tmp_path / "model.onnx")
    with pytest.raises(MissingFileError, match=r"model\.pt"):
        export.load_exported(tmp_path / "model.pt")


def test_the_docstring_snippet_classifies_a_jpeg_as_the_model_does(tmp_path, monkeypatch, capsys):
    (snippet,) = re.findall(r"```python\n(.*?)```", export.__doc__, flags=re.S)
    assert len([line for line in snippet.splitlines() if line.strip()]) <= 12
    # 120 x 90 px -> the short side 56 (round(49 / 0.875)), the long side int(74.67) = 74; the 49 px crop then
    # starts at round(12.5) = 12 from the left and round(3.5) = 4 from the top, as torchvision rounds
    model, meta = tiny_classifier(), tiny_meta(image_size=49, temperature=2.0)
    export.export_onnx(model, meta, tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 120)[None, :, None] * np.array([1, 0, -1]) + np.array([0, 120, 255])  # crop-sensitive
    pixels = np.clip(ramp + rng.normal(0, 20, (90, 120, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=90)

    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "export-snippet", "exec"), {})
    name, prob = capsys.readouterr().out.split()

    image = eval_transform(InputConfig.from_dict(meta))(read_rgb(tmp_path / "photo.jpg"))
    with torch.no_grad():
        probs = (model(image[None]) / meta["temperature"]).softmax(dim=1)[0]
    assert name == meta["classes"][int(probs.argmax())]
    assert float(prob) == pytest.approx(float(probs.max()), abs=1e-4)
