"""demo.py, the Gradio page of a checkpoint: the documented command serves predict.py's answer through its HTTP
API and nothing leaves the machine; bad options, an unreadable image and a missing Gradio are one clear error;
the page itself in headless Chromium (slow)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from PIL import Image

from finetune.data.transforms import eval_transform
from finetune.demo import classifier, import_gradio, serve
from finetune.errors import ConfigError, MissingPackageError
from finetune.models.module import FineTuneModule
from finetune.predict import predict
from finetune.train import train
from tests.helpers import PROJECT_ROOT, SMALL_MODEL, TINY, compose_train, doc_commands, doc_section

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """A tiny run's last.ckpt (classes blue and red), in a run folder `<root>/run`."""
    root = tmp_path_factory.mktemp("trained")
    train(compose_train(root, ["data=imagefolder", f"data.root={image_folder}", *TINY, *SMALL_MODEL]))
    return root / "run" / "checkpoints" / "last.ckpt"


def predicted_top1(ckpt: Path, image: Path, tmp_path: Path) -> tuple[str, float]:
    """predict.py's top class and probability for `image` (its CSV's row)."""
    model = FineTuneModule.from_checkpoint(ckpt)
    output = tmp_path / "predictions.csv"
    predict(
        model, model.meta, [image], eval_transform(model.input_config), device="cpu", output_csv=output, progress=False
    )
    with open(output, newline="") as file:
        (row,) = csv.DictReader(file)
    return row["top1_class"], float(row["top1_prob"])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(ckpt: Path, root: Path, proxy: int) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """The documented command on `ckpt` and a free port, until the block ends (then Ctrl-C): its page's URL, its
    process and its output file. Any request to another host goes to the proxy at 127.0.0.1:`proxy`."""
    (command,) = doc_commands("docs/after-training.md", "## A demo page: `demo.py`")
    typed = command.replace("logs/train/runs/<run>/checkpoints/last.ckpt", str(ckpt))
    port, output = free_port(), root / "demo.out"
    env = {**os.environ, "FINETUNE_ROOT": str(root), "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # off because demo.py turns it off
    env.update({name: f"http://127.0.0.1:{proxy}" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")})
    with open(output, "w") as out:
        process = subprocess.Popen(
            [sys.executable, *shlex.split(typed)[1:], f"demo.port={port}"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, output.read_text()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url, timeout=2).close()
                break
            time.sleep(0.5)
        yield url, process, output
    finally:
        process.send_signal(signal.SIGINT)  # as Ctrl-C in its terminal
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"no exit on Ctrl-C (a request to another host waits?)\n{output.read_text()}"
            ) from None


@pytest.fixture
def proxy() -> Iterator[socket.socket]:
    """A socket that a request leaving the machine would reach (through the proxy settings `served` gives)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        yield listener


def test_the_documented_command_serves_predict_py_s_answer_offline(checkpoint, image_folder, tmp_path, proxy):
    image = image_folder / "test" / "red" / "000.png"
    snippet = re.search(
        r"```python\n(.*?)```", doc_section("docs/after-training.md", "## A demo page: `demo.py`"), flags=re.S
    ).group(1)
    printed = io.StringIO()
    with served(checkpoint, tmp_path, proxy.getsockname()[1]) as (url, process, output):
        typed = snippet.replace("http://127.0.0.1:7860/", url).replace('"photo.jpg"', repr(str(image)))
        with contextlib.redirect_stdout(printed):
            exec(typed, {})  # the documented client, as typed
    top_class, probability = printed.getvalue().splitlines()[-1].split()  # after the client's "Loaded as API"
    expected_class, expected_probability = predicted_top1(checkpoint, image, tmp_path)
    assert top_class == expected_class
    assert float(probability) == pytest.approx(expected_probability, abs=1e-6)  # the CSV's 6 decimals
    assert process.returncode == 0, output.read_text()
    assert f"Demo of {checkpoint} at {url} (Ctrl-C stops it)" in output.read_text()
    with pytest.raises(BlockingIOError):  # no connection waits: nothing went to another host
        proxy.accept()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("demo.port=http", r"demo.port=http must be a port number from 1 to 65535, e.g. demo.port=7860"),
        ("demo.top_k=0", r"demo.top_k=0 must be an integer >= 1"),
    ],
)
def test_a_bad_option_is_named_before_the_checkpoint_is_read(tmp_path, option, message):
    with pytest.raises(ConfigError, match=message):
        serve(compose_train(tmp_path, [f"ckpt_path={tmp_path / 'none.ckpt'}", option], "demo"))


def test_a_port_in_use_says_to_choose_another(checkpoint, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = compose_train(tmp_path, [f"ckpt_path={checkpoint}", f"demo.port={port}"], "demo")
        with pytest.raises(ConfigError, match=rf"demo.port={port}: cannot serve there .*choose another port"):
            serve(cfg)


def test_an_unreadable_or_missing_image_is_an_error_on_the_page(checkpoint, tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(jpeg, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    classify = classifier(FineTuneModule.from_checkpoint(checkpoint), torch.device("cpu"))
    with pytest.raises(import_gradio().Error, match="(?i)the image cannot be read: OSError: truncated"):
        classify(str(truncated))
    with pytest.raises(import_gradio().Error, match="Drop an image first"):
        classify(None)  # Submit with no image


def test_without_gradio_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio fails as when it is not installed
    cfg = compose_train(tmp_path, [f"ckpt_path={tmp_path / 'none.ckpt'}"], "demo")
    with pytest.raises(MissingPackageError, match=re.escape('pip install -e ".[demo]" installs it')):
        serve(cfg)


@pytest.mark.slow
def test_the_page_in_chromium_classifies_a_dropped_image_offline(checkpoint, image_folder, tmp_path, proxy):
    """The page as a user sees it: headless Chromium (`apt-get install chromium`) driven by Playwright."""
    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium")
    if browser_path is None:
        pytest.skip("no chromium: apt-get install chromium")
    image = image_folder / "test" / "blue" / "000.png"
    with served(checkpoint, tmp_path, proxy.getsockname()[1]) as (url, _, _), sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_path)
        page = browser.new_page()
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(url)
        title = page.locator("h1").inner_text()
        page.locator("input[type=file]").set_input_files(image)
        page.get_by_role("button", name="Submit").click()
        top_class = page.get_by_test_id("label-output-value").inner_text()
        probability = float(page.get_by_role("meter", name=top_class).get_attribute("value"))
        browser.close()
    assert title == "test_resnet classifier of 2 classes: blue, red"
    expected_class, expected_probability = predicted_top1(checkpoint, image, tmp_path)
    assert top_class == expected_class and probability == pytest.approx(expected_probability, abs=1e-6)
    hosts = {urlsplit(address).netloc for address in requested if urlsplit(address).scheme != "data"}
    assert hosts == {urlsplit(url).netloc}, requested  # the page, its fonts and scripts: all from the demo
    with pytest.raises(BlockingIOError):
        proxy.accept()
