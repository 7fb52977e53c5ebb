"""``python -m torch_medloss segdemo``: the segmentation study on the MNI152 brain template that nilearn ships."""
