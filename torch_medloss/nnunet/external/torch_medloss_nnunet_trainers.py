from torch_medloss.nnunet.trainers import *  # noqa: F403 - nnU-Net finds trainers by name in this module
