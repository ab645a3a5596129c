"""A Gradio page for a trained model: drop an image, see its top classes with their probabilities.

`python demo.py ckpt_path=<run>/checkpoints/last.ckpt [demo.port=7860]` (`main`) rebuilds the model from the
checkpoint alone (`FineTuneModule.from_checkpoint`) and classifies each image with predict.py's code (the file
read by `load_image`, the checkpoint's eval transform, softmax(logits / its temperature)), so the page shows what
predictions.csv says. The page is served on this machine (`demo.host`) and works offline: Gradio's analytics are
off, its default theme's fonts come from the package, and there is no share link unless `demo.share=true`. Its
HTTP API (`/classify`, for `gradio_client`) takes the same image.

Gradio is an optional package: `pip install -e ".[demo]"` (the dev install has it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import hydra
import torch
from omegaconf import DictConfig

from finetune.analysis import softmax_probs
from finetune.checkpoint import checkpoint_file
from finetune.config import CONFIG_DIR
from finetune.data.transforms import decode_side, eval_transform
from finetune.errors import ConfigError, MissingPackageError, exit_on_user_error
from finetune.models.module import FineTuneModule
from finetune.predict import default_device, load_image
from finetune.validation import missing_values, validate

if TYPE_CHECKING:
    import gradio as gr

API_NAME = "classify"  # the page's endpoint: /classify
LISTED_CLASSES = 20  # the page's title names this many classes, then says how many more


def import_gradio() -> ModuleType:
    """The gradio package, or a MissingPackageError that says how to install it."""
    try:
        import gradio
    except ModuleNotFoundError as err:
        raise MissingPackageError(
            f'demo.py needs Gradio, which is not installed ({err}): pip install -e ".[demo]" installs it'
        ) from err
    return gradio


def class_probabilities(model: FineTuneModule, image: torch.Tensor) -> dict[str, float]:
    """What the page shows for one transformed image: each class and its probability, softmax(logits /
    temperature) as predict.py computes it (the page lists the `demo.top_k` highest). A multi-label model's: the
    labels predict.py writes, those whose sigmoid(logits / temperature) is at least their threshold, with it."""
    meta = model.meta
    if meta.get("multilabel"):
        probs = (model(image.unsqueeze(0))[0].float() / meta["temperature"]).sigmoid().tolist()
        return {c: p for c, p, t in zip(model.classes, probs, meta["thresholds"], strict=True) if p >= t}
    probs = softmax_probs(model, image.unsqueeze(0), meta["temperature"])[0]
    return dict(zip(model.classes, probs.tolist(), strict=True))


def classifier(model: FineTuneModule, device: torch.device) -> Callable[[str | None], dict[str, float]]:
    """The page's function: an image file (as Gradio saves an upload) -> `class_probabilities`, on `device`."""
    model.eval().to(device)
    transform = eval_transform(model.input_config)

    def classify(path: str | None) -> dict[str, float]:
        if path is None:  # Submit before an image was dropped
            raise import_gradio().Error("Drop an image first")
        _, image, error = load_image(path, transform, decode_side(model.input_config))
        if image is None:
            raise import_gradio().Error(f"The image cannot be read: {error}")
        with torch.inference_mode():
            return class_probabilities(model, image.to(device))

    return classify


def page_title(model: FineTuneModule) -> str:
    """The page's title: the backbone and the classes of the checkpoint."""
    classes = model.classes
    listed = ", ".join(classes[:LISTED_CLASSES])
    more = f" and {len(classes) - LISTED_CLASSES} more" if len(classes) > LISTED_CLASSES else ""
    return f"{model.hparams.backbone['name']} classifier of {len(classes)} classes: {listed}{more}"


def build_page(model: FineTuneModule, top_k: int = 5, device: str | torch.device = "cpu") -> gr.Interface:
    """The page: an image in, its top `top_k` classes out (gr.Label), titled from the checkpoint; no analytics,
    no flagging (which would write the images it is shown into the working folder)."""
    gr = import_gradio()
    return gr.Interface(
        fn=classifier(model, torch.device(device)),
        inputs=gr.Image(type="filepath", label="Image"),  # the uploaded file itself, as predict.py reads a file
        outputs=gr.Label(num_top_classes=top_k, label="Top classes"),
        title=page_title(model),
        description="Drop an image to see its most likely classes and their probabilities.",
        flagging_mode="never",
        analytics_enabled=False,
        api_name=API_NAME,
    )


def demo_problems(cfg: DictConfig) -> list[str]:
    """The values demo.py must be given, a port number and a positive top_k."""
    problems = missing_values(cfg)
    port, top_k = cfg.demo.port, cfg.demo.top_k
    if not (type(port) is int and 0 < port < 65536):
        problems.append(f"demo.port={port} must be a port number from 1 to 65535, e.g. demo.port=7860")
    if not (type(top_k) is int and top_k > 0):
        problems.append(f"demo.top_k={top_k} must be an integer >= 1")
    return problems


def serve(cfg: DictConfig) -> None:
    """`demo.py`: the checkpoint's page on `demo.host:demo.port` until Ctrl-C."""
    validate(cfg, demo_problems)
    options = cfg.demo
    import_gradio()  # a missing package says so before the model is read
    model = FineTuneModule.from_checkpoint(checkpoint_file(cfg.ckpt_path))
    page = build_page(model, options.top_k, options.device or default_device())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of Gradio's start-up checks
    try:
        page.launch(
            server_name=options.host,
            server_port=options.port,
            share=options.share,
            quiet=True,  # Gradio's hints name launch()'s arguments; the line below names the config's
            prevent_thread_lock=True,
        )
    except OSError as err:  # the port is taken, or the host is not an address of this machine
        raise ConfigError(
            f"demo.host={options.host} demo.port={options.port}: cannot serve there ({err}); choose another port "
            "(demo.port=7861) or host"
        ) from err
    print(f"Demo of {cfg.ckpt_path} at {page.share_url or page.local_url} (Ctrl-C stops it)", flush=True)
    page.block_thread()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(serve, cfg)
