"""python compare.py data=imagefolder data.root=DIR [train.py overrides] [compare.* keys]  (see docs/compare.md)"""

from finetune.compare import main

if __name__ == "__main__":
    main()
