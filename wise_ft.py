"""python wise_ft.py ckpt_path=<run>/checkpoints/last.ckpt  (see docs/after-training.md)"""

from finetune.wise_ft import main

if __name__ == "__main__":
    main()
