"""``python -m torch_medloss bench``: forward+backward time and memory of the losses, against what people use today.

One run compares, per workload and loss, the fused backends that can run on the device (Triton and CUDA on a GPU,
C++ on a CPU), the pure-PyTorch reference in eager mode and under ``torch.compile``, MONAI's loss and nnU-Net's
memory-efficient Dice when those are installed. Anything it cannot measure is a row that says why.

Modules:
    workloads: the embedded default workloads (GPU: the shapes of shared/BASELINES.md; CPU: scaled down), the loss
        registry and the parsing of ``--shape``, ``--dtype``, ``--losses``, ``--providers``.
    providers: one setup function per implementation; each returns the loss module or the reason it cannot run.
    runner: timing (``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark`` on a CPU), peak memory, copy
        bandwidth and the progress line.
    report: the markdown table, the JSON file and the optional PNG chart.
    cli: the command's arguments and entry point (``torch_medloss.__main__`` adds it as ``bench``).
"""
