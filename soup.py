"""python soup.py sweep_dir=logs/train/multiruns/<sweep>  (see docs/after-training.md)"""

from finetune.soup import main

if __name__ == "__main__":
    main()
