"""The folder ``python -m torch_medloss nnunet path`` prints, for nnU-Net's ``nnUNet_extTrainer`` (nnunetv2 >= 2.8).

nnU-Net adds this folder to ``sys.path`` and imports each module in it (this ``__init__`` is not one of them) until
one has the trainer it looks for. The one module here re-exports torch_medloss.nnunet.trainers; its name is unique
so that it cannot shadow another top-level module.
"""
