"""python eval.py ckpt_path=<run>/checkpoints/last.ckpt  (see docs/after-training.md)"""

from finetune.eval import main

if __name__ == "__main__":
    main()
