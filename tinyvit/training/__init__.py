"""``tinyvit train``: the training loop and what it needs around the model.

- ``train.py``       the loop, its config and the command
- ``data.py``        the bundled digits, image folders, ``.npz``; split, batches, normalisation
- ``augment.py``     crop, flip, Mixup, CutMix, a RandAugment subset
- ``optim.py``       SGD, AdamW, clipping, warm-up + cosine
- ``amp.py``         the dynamic loss scale of fp16 training (``torch.amp.GradScaler``'s rule)
- ``distill.py``     DeiT's hard distillation loss, forward and backward
- ``checkpoint.py``  safetensors checkpoints and atomic writes (no code runs on load)
"""
