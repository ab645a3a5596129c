"""python eval.py ckpt_path=<run>/checkpoints/last.ckpt  (see README.md)"""

from finetune.eval import main

if __name__ == "__main__":
    main()
