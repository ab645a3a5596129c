"""Bad input, tried systematically: every config group fed wrong values (negative, zero, wrong type, unknown option,
missing path) ends in one `Error:` message that names the key, never a traceback.

48 cases: 47 values in `CASES` (data 14, model 3, strategy 7, optimizer 3, scheduler 2, loss 3, regularizer 3,
trainer 6, callbacks 2, top level 4), run as `train.py` runs them (`exit_on_user_error`: a UserError is the `Error:`
line, any other exception a traceback); and an unknown option of a group (`optimizer=`) typed on the command line,
which Hydra answers with the group and its options, also without a traceback.
"""

from __future__ import annotations

import pytest

from finetune.errors import exit_on_user_error
from finetune.train import train
from tests.helpers import SMALL_MODEL, compose_train, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# Over a tiny run of the defaults on generated images: a value that got through would train (and fail the test).
TINY = ["debug=tiny", *SMALL_MODEL]

# override -> the key its message must name
CASES = {
    # data
    "data.batch_size=-4": "data.batch_size",
    "data.batch_size=abc": "data.batch_size",
    "data.batch_size=2.5": "data.batch_size",
    "data.root=/nonexistent/images": "data.root",
    "data.image_size=abc": "data.image_size",
    "data.image_size=0": "data.image_size",
    "data.val_fraction=-0.1": "data.val_fraction",
    "data.val_fraction=half": "data.val_fraction",
    "data.num_workers=-1": "data.num_workers",
    "data.augment=blur": "data.augment",
    "data.random_erasing=yes": "data.random_erasing",
    "data.mixup=-1": "data.mixup",
    "data.cutmix=lots": "data.cutmix",
    "data.sampler=random": "data.sampler",
    # model
    "model.name=resnet1000": "model.name",
    "model.weights_path=/nonexistent/weights.pth": "model.weights_path",
    "model.head_init=imagenet": "model.head_init",
    # strategy
    "strategy.head_lr_mult=-1": "strategy.head_lr_mult",
    "strategy.backbone_lr_mult=zero": "strategy.backbone_lr_mult",
    "strategy.unfreeze_at=[-1]": "strategy.unfreeze_at",
    "strategy.unfreeze_at=one": "strategy.unfreeze_at",
    "strategy.trainable=-2": "strategy.trainable",
    "strategy.bn=frozen": "strategy.bn",
    "strategy.pretrained=maybe": "strategy.pretrained",
    # optimizer
    "optimizer.lr=0": "optimizer.lr",
    "optimizer.lr=fast": "optimizer.lr",
    "optimizer.weight_decay=-0.1": "optimizer.weight_decay",
    # scheduler (the default warmup_cosine)
    "scheduler.warmup=-1": "scheduler.warmup",
    "scheduler.warmup=2.5": "scheduler.warmup",
    # loss
    "loss.label_smoothing=1.5": "loss.label_smoothing",
    "loss.class_weights=[1]": "loss.class_weights",
    "loss.class_weights=heavy": "loss.class_weights",
    # regularizer
    "regularizer=l2sp regularizer.alpha=-1": "regularizer.alpha",
    "regularizer=bss regularizer.k=0": "regularizer.k",
    "regularizer=co_tuning": "strategy.pretrained",  # a random init: no source to stay near
    # trainer
    "trainer.max_epochs=0": "trainer.max_epochs",
    "trainer.max_epochs=-3": "trainer.max_epochs",
    "trainer.max_epochs=many": "trainer.max_epochs",
    "trainer.precision=fp8": "trainer.precision",
    "trainer.gradient_clip_val=-1": "trainer.gradient_clip_val",
    "trainer.gradient_clip_val=big": "trainer.gradient_clip_val",
    # callbacks
    "callbacks.feature_cache.enabled=true callbacks.feature_cache.views=0 strategy=freeze": (
        "callbacks.feature_cache.views"
    ),
    "callbacks.ema.enabled=sometimes": "callbacks.ema.enabled",
    # top level
    "seed=-1": "seed",
    "seed=abc": "seed",
    "ckpt_path=/nonexistent/last.ckpt": "ckpt_path",
    "validate_first=maybe": "validate_first",
}


@pytest.mark.parametrize("override", CASES)
def test_a_wrong_value_is_one_error_that_names_its_key(tmp_path, image_folder, override):
    cfg = compose_train(tmp_path, ["data=imagefolder", f"data.root={image_folder}", *TINY, *override.split()])
    with pytest.raises(SystemExit) as stopped:  # anything else would be a traceback
        exit_on_user_error(train, cfg)
    message = str(stopped.value.code)
    assert message.startswith("Error: ") and CASES[override] in message


@pytest.mark.parametrize("override", ["optimizer=rmsprop"])  # composing names any group's options: test_errors
def test_an_unknown_option_of_a_group_names_the_group_and_its_options(tmp_path, override):
    result = run_cli(["train.py", override], tmp_path, timeout=120)
    group, option = override.split("=")
    assert result.returncode == 1 and "Traceback" not in result.output
    assert f"Could not find '{group}/{option}'" in result.output and f"Available options in '{group}'" in result.output
