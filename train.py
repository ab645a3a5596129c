"""python train.py [group=option ...] [key=value ...]  (see docs/training.md)"""

from finetune.train import main

if __name__ == "__main__":
    main()
