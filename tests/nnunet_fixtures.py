"""Plans, dataset descriptions and batches for tests/test_nnunet.py (not collected by pytest).

The plans have the layout nnU-Net 2.8's planner writes (this is what it wrote for a small synthetic dataset, trimmed,
with narrow networks so a training step is quick on a CPU): a 3d_fullres configuration with anisotropic spacing and
three deep-supervision outputs in use, and a 2d one.
"""

import copy

import torch

_ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def _configuration(dims: int) -> dict:
    if dims == 3:
        patch, spacing = [8, 16, 16], [2.0, 1.0, 1.0]
        strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]
        kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    else:
        patch, spacing = [16, 16], [1.0, 1.0]
        strides = [[1, 1], [2, 2], [2, 2], [2, 2]]
        kernels = [[3, 3]] * 4
    kwargs = {"n_stages": 4, "features_per_stage": [4, 8, 16, 16], "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
              "kernel_sizes": kernels, "strides": strides, "n_conv_per_stage": [1, 1, 1, 1],
              "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
              "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": f"nnUNetPlans_{dims}d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": patch, "median_image_size_in_voxels": [float(p) for p in patch], "spacing": spacing,
        "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": {**_ARCHITECTURE, "arch_kwargs": kwargs},
        "batch_dice": dims == 3,
    }


def plans() -> dict:
    """A fresh plans dict (nnUNetTrainer.__init__ pops a key from it)."""
    return copy.deepcopy({
        "dataset_name": "Dataset900_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.0], "original_median_shape_after_transp": [8, 16, 16],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": _configuration(3), "2d": _configuration(2)},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3.0, "mean": 1.0, "median": 1.0, "min": -1.0, "percentile_00_5": -0.5, "percentile_99_5": 2.5,
            "std": 0.5}},
        # nnunetv2 2.8 reads (and removes) this one; run_training sets it from --c.
        "continue_training": False,
    })


def dataset_json(kind: str) -> dict:
    """"labels": background and 2 classes; "ignore": plus ignore label 3; "regions": 2 overlapping regions;
    "regions_ignore": the regions plus ignore label 3."""
    labels = {"labels": {"background": 0, "organ": 1, "lesion": 2},
              "ignore": {"background": 0, "organ": 1, "lesion": 2, "ignore": 3},
              "regions": {"background": 0, "whole": [1, 2], "core": 2},
              "regions_ignore": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}}[kind]
    out = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    if kind.startswith("regions"):
        out["regions_class_order"] = [1, 2]
    return out


def label_map(shape, num_labels: int, ignore_label: int | None, generator: torch.Generator) -> torch.Tensor:
    """int16 labels (B, 1, *S) in [0, num_labels), a third of them ignore_label when given."""
    labels = torch.randint(0, num_labels, shape, generator=generator)
    if ignore_label is not None:
        labels = torch.where(torch.rand(shape, generator=generator) < 0.3, ignore_label, labels)
    return labels.to(torch.int16)


def regions_of(labels: torch.Tensor, ignore_label: int | None) -> torch.Tensor:
    """The two regions of dataset_json("regions"), whole = {1, 2} and core = {2}, as nnU-Net's transform makes
    them (bool, (B, 2, *S)), with the ignore channel last when ignore_label is given."""
    channels = [(labels == 1) | (labels == 2), labels == 2]
    if ignore_label is not None:
        channels.append(labels == ignore_label)
    return torch.cat(channels, 1)


def downsample(target: torch.Tensor, scales) -> list[torch.Tensor]:
    """Nearest-neighbour targets for each deep-supervision scale (a fraction per axis), as lists nnU-Net feeds."""
    out = []
    for scale in scales:
        index = (slice(None), slice(None), *(slice(None, None, round(1 / s)) for s in scale))
        out.append(target[index].contiguous())
    return out
