"""``python -m torch_medloss denoise``: train and evaluate the denoisers on scikit-image's photographs.

Modules: ``cli`` (arguments, the train/eval driver), ``data`` (images, patches, seeded noise), ``train`` (models by
name, Adam with a cosine schedule, progress), ``metrics`` (PSNR, SSIM), ``report`` (markdown and JSON tables).
scikit-image is imported only when the command runs.
"""
