"""The peer benchmark (benchmarks/peers.py): fastai's one-liner against our recipe on the same data and weights."""

from __future__ import annotations

import importlib.util
import json

import pytest
import timm
import torch

from benchmarks import peers
from finetune.models.backbones import timm_backbone


def test_fastai_gets_the_package_imagenet_weights_through_timm(tmp_path):
    options = peers.fastai_weights("tf_efficientnet_lite0", tmp_path)
    # what fastai's create_timm_model calls: the classifier dropped, the rest from the file
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True, num_classes=0, **options)
    ours = timm_backbone("tf_efficientnet_lite0", package_weights=True)
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image), ours.eval()(image).flatten(1))


@pytest.mark.slow  # the benchmark's harness end to end (20 s); the peer model's equivalence is tested above
def test_tiny_benchmark_runs_both_peers_and_tabulates(tmp_path, image_folder, capsys):
    both = importlib.util.find_spec("fastai") is not None  # an optional extra: pip install -e ".[peers]"
    chosen = ["fastai", "ours"] if both else ["ours"]
    tiny = ["--tiny", str(image_folder), "--data", "tiny", "--seeds", "1", "--epochs", "2", "--peers", *chosen]
    earlier = {"data": "tiny", "peer": "ours", "seed": 0, "test_acc": 1.0, "fit_s": 1.0}  # an earlier invocation's
    (tmp_path / "runs.jsonl").write_text(json.dumps(earlier) + "\n")
    results = peers.main([*tiny, "--arch", "mobilenetv3_small_050", "--out", str(tmp_path / "runs.jsonl")])
    assert [r["peer"] for r in results] == ["ours", *chosen]
    for result in results[1:]:
        assert 0.0 <= result["test_acc"] <= 1.0 and result["fit_s"] > 0
    table = capsys.readouterr().out.splitlines()[-1]
    assert table.startswith("| tiny |") and " (2) |" in table  # both of our runs in the table
    assert ("| - |" in table) != both  # a peer not run is a dash


@pytest.mark.skipif(importlib.util.find_spec("fastai") is None, reason="fastai not installed (extra: peers)")
def test_fastai_validates_on_the_test_split_when_asked(tmp_path, image_folder):
    data = peers.Dataset(image_folder, 32, 0.0)
    result = peers.run_fastai(data, seed=1, epochs=2, arch="mobilenetv3_small_050", pretrained=False)
    assert 0.0 <= result["test_acc"] <= 1.0
