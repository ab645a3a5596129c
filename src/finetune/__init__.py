"""finetune: transfer learning of image classifiers with Lightning and Hydra."""
