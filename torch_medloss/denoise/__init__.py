"""``python -m torch_medloss denoise``: train and evaluate the denoisers on scikit-image's photographs."""
