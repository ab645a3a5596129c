"""python demo.py ckpt_path=<run>/checkpoints/last.ckpt [demo.port=7860]  (see docs/after-training.md)"""

from finetune.demo import main

if __name__ == "__main__":
    main()
