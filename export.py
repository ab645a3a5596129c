"""python export.py ckpt_path=<run>/checkpoints/last.ckpt format=onnx|torchscript  (see docs/after-training.md)"""

from finetune.export import main

if __name__ == "__main__":
    main()
