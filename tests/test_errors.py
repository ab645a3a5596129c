"""Bad input gets a clear error and leaves nothing half-written: no network, corrupt downloads, unknown names,
values the command line must give, missing or inconsistent data folders (unreadable images: test_bad_data.py)."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.errors import HydraException

import finetune.data.hotdog
from finetune.builders import build, build_datamodule
from finetune.errors import ConfigError, DataError, DownloadError, MissingFileError
from tests.helpers import SMALL_MODEL, TINY, compose_train, make_image_folder, run_cli

RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture
def offline(monkeypatch):
    """Any download fails as it does on a machine without network."""

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(finetune.data.download.urllib.request, "urlretrieve", refuse)


def hotdog(tmp_path):
    return build_datamodule(compose_train(tmp_path, ["data=hotdog"]))


def test_hotdog_without_network_says_what_and_how_to_give_it_locally(tmp_path, offline):
    datamodule = hotdog(tmp_path)
    with pytest.raises(DownloadError) as error:
        datamodule.prepare_data()
    data_dir = tmp_path / "data"
    assert str(error.value).startswith(f"Could not download {finetune.data.hotdog.HOTDOG_URL} (")
    assert f"put hotdog.zip into {data_dir}, or pass data.root=<folder with train/ and test/>" in str(error.value)
    assert list(data_dir.iterdir()) == []  # no partial download


def hotdog_zip(tmp_path):
    """A small hotdog.zip laid out as d2l's: hotdog/{train,test}/{hotdog,not-hotdog}/."""
    make_image_folder(tmp_path / "zip" / "hotdog", classes=("hotdog", "not-hotdog"), train=2, test=1)
    return shutil.make_archive(str(tmp_path / "hotdog"), "zip", tmp_path / "zip")


def test_a_corrupt_download_is_detected_by_its_checksum_and_removed(tmp_path, monkeypatch):
    archive = hotdog_zip(tmp_path)
    monkeypatch.setattr(finetune.data.hotdog, "HOTDOG_URL", f"file://{archive}")  # served locally, no network
    datamodule, data_dir = hotdog(tmp_path), tmp_path / "data"
    with pytest.raises(
        DownloadError, match=r"hotdog.zip is corrupt \(SHA-1 \w+, expected fba480ff\w+\); it was removed"
    ):
        datamodule.prepare_data()
    assert list(data_dir.iterdir()) == []
    (data_dir / "hotdog.zip").write_bytes(b"half a download")  # a broken copy given locally: the same
    with pytest.raises(DownloadError, match="corrupt"):
        datamodule.prepare_data()
    assert list(data_dir.iterdir()) == []
    sha1 = hashlib.sha1(Path(archive).read_bytes()).hexdigest()
    monkeypatch.setattr(finetune.data.hotdog, "HOTDOG_SHA1", sha1)  # now the archive is the expected one
    datamodule.prepare_data()
    assert sorted(p.name for p in data_dir.iterdir()) == ["hotdog", "hotdog.zip"]  # no staging folder left
    assert datamodule.classes == ["hotdog", "not-hotdog"] and len(datamodule.read_split("train")) == 4


def resnet18_config(tmp_path, image_folder):
    return compose_train(tmp_path, ["model=resnet18", "data=imagefolder", f"data.root={image_folder}", *TINY])


def test_torchvision_weights_offline_say_where_to_put_the_file(tmp_path, image_folder, offline, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(DownloadError) as error:
        build(resnet18_config(tmp_path, image_folder))
    message = str(error.value)
    assert f"weights of 'resnet18' from https://download.pytorch.org/models/{RESNET18_FILE}" in message
    assert f"Put the file at {tmp_path}/torch/hub/checkpoints/{RESNET18_FILE}" in message
    assert f"($TORCH_HOME/hub/checkpoints/{RESNET18_FILE})" in message
    assert "model.weights_path=<state dict file>, or strategy.pretrained=false" in message
    assert list((tmp_path / "torch" / "hub" / "checkpoints").iterdir()) == []


def test_torchvision_weights_put_into_torch_home_are_loaded_exactly(tmp_path, image_folder, offline, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(1)
    weights = {k: torch.randn(v.shape).to(v.dtype) for k, v in torchvision.models.resnet18().state_dict().items()}
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(weights, tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE)
    _, model = build(resnet18_config(tmp_path, image_folder))
    # torchvision names -> the backbone's stages (stem, layer1-3, layer4 + pooling)
    stage = {"conv1": "0.0", "bn1": "0.1", "layer1": "1", "layer2": "2", "layer3": "3", "layer4": "4.0"}
    expected = {
        f"stages.{stage[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
        for k, v in weights.items()
        if not k.startswith("fc.")
    }
    loaded = model.backbone.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_timm_weights_offline_say_where_the_hugging_face_hub_cache_is(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing tries the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    result = run_cli(
        ["train.py", "model=timm", "model.name=resnet18", "data=imagefolder", f"data.root={image_folder}"],
        tmp_path,
        fresh=True,  # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported
    )
    assert result.returncode == 1, result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert error.startswith(
        "Error: Could not fetch or read the pretrained weights of 'resnet18' from the Hugging Face hub (timm/resnet18.a1_in1k) ("
    )
    assert error.endswith(
        f"Offline? Put a copy of the hub's timm/resnet18.a1_in1k (its folder models--timm--resnet18.a1_in1k) into "
        f"{tmp_path}/hf/hub ($HF_HOME/hub, the Hugging Face hub cache), or pass model.weights_path=<state dict file>, "
        "or strategy.pretrained=false."
    )
    assert "Traceback" not in result.output and "TORCH_HOME" not in result.output


@pytest.mark.parametrize(
    "command, key, example",
    [
        (["eval.py"], "ckpt_path", "python eval.py 'ckpt_path=logs/train/runs/<timestamp>/checkpoints/last.ckpt'"),
        (
            ["train.py", "data=imagefolder", "strategy.pretrained=false"],
            "data.root",
            "python train.py data=imagefolder strategy.pretrained=false data.root=/path/to/images",
        ),
    ],
)
def test_a_value_the_command_must_give_is_named_with_an_example(tmp_path, command, key, example):
    result = run_cli(command, tmp_path)
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"Error: Invalid config:\n  {key} is not set (??? in the config): add it, e.g. {example}\n"
    ), result.output
    assert "Traceback" not in result.output and "MissingMandatoryValue" not in result.output


@pytest.mark.parametrize("group, listed", [("model", "efficientnet_lite0"), ("data", "synthetic")])
def test_an_unknown_option_lists_the_valid_ones(tmp_path, group, listed):
    with pytest.raises(HydraException, match=rf"Could not find '{group}/foo'\n\nAvailable options in '{group}':") as e:
        compose_train(tmp_path, [f"{group}=foo"])
    assert f"\t{listed}\n" in str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model=timm", "model.name=resnet_typo"],
            "model.name: unknown timm model 'resnet_typo'. Did you mean: tresnet_m, tresnet_l, resnet50t",
        ),
        (
            ["model.name=resnet19"],
            "model.name: unknown torchvision backbone 'resnet19'. Did you mean: resnet18, resnet101, resnet50, "
            "resnet34? Valid names: mobilenet_v2, resnet101, resnet18, resnet34, resnet50.",
        ),
    ],
)
def test_an_unknown_backbone_name_suggests_close_ones(tmp_path, image_folder, overrides, message):
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *overrides])
    with pytest.raises(ConfigError) as error:
        build(cfg)
    assert str(error.value).startswith(message)


def setup_data(tmp_path, root):
    datamodule, _ = build(compose_train(tmp_path, ["data=imagefolder", f"data.root={root}", *TINY, *SMALL_MODEL]))
    datamodule.setup("fit")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(MissingFileError, match=rf"data.root: no such folder: {tmp_path}/nowhere \(expected train/"):
        setup_data(tmp_path, tmp_path / "nowhere")
    make_image_folder(tmp_path / "data", train=1, test=1)
    shutil.rmtree(tmp_path / "data" / "test")
    with pytest.raises(MissingFileError, match=rf"Missing folder {tmp_path}/data/test \(expected one sub-folder per"):
        setup_data(tmp_path, tmp_path / "data")


def test_an_empty_class_folder_is_named(tmp_path):
    make_image_folder(tmp_path / "data", train=1, test=1)
    (tmp_path / "data" / "train" / "red" / "000.png").unlink()
    with pytest.raises(DataError, match=rf"Class folder {tmp_path}/data/train/red holds no images \(\.jpg, \.jpeg"):
        setup_data(tmp_path, tmp_path / "data")


def test_train_and_test_with_different_classes_are_named(tmp_path):
    make_image_folder(tmp_path / "data", train=1, test=1)
    (tmp_path / "data" / "test" / "red").rename(tmp_path / "data" / "test" / "green")
    with pytest.raises(DataError) as error:
        setup_data(tmp_path, tmp_path / "data")
    assert str(error.value).startswith(
        f"{tmp_path}/data/test has classes ['blue', 'green'], but the training split has ['blue', 'red'] "
        "(missing: ['red'], extra: ['green'])"
    )
