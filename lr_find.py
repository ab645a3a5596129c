"""python lr_find.py [train.py's overrides]  (see docs/training.md, "Finding a learning rate")"""

from finetune.lr_find import main

if __name__ == "__main__":
    main()
