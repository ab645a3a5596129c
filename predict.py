"""python predict.py ckpt_path=<run>/checkpoints/last.ckpt input=<image | folder | glob>  (see docs/after-training.md)"""

from finetune.predict import main

if __name__ == "__main__":
    main()
