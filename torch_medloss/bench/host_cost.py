"""Host cost of a call: the PyTorch ops that do work and the kernel launches it dispatches.

Counted, not timed, so the figure is the same on every machine and a test can assert it: a ``TorchDispatchMode``
sees every ATen op the call dispatches (views, allocations and other metadata ops are left out: they launch no
work), and a hook on Triton's launcher counts each Triton kernel launch (on a GPU, and on CPU tensors through the
interpreter, which takes the same Python path). A C++/CUDA op of this package counts as one launch (its kernels
are launched from C++, out of sight of both hooks). On a GPU every counted op is at least one kernel launch and
several microseconds of host time.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that allocate or relabel memory without launching work.
_FREE = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
    "_local_scalar_dense", "set_", "resize_", "_reshape_alias", "view", "_unsafe_view", "as_strided",
    "unsqueeze", "squeeze", "permute", "expand", "select", "slice", "t", "transpose", "unbind", "split",
    "_to_copy_noop", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
}


@dataclass
class HostCost:
    """What one call dispatched: ``ops`` (ATen ops that do work, by name), ``launches`` (kernel launches by kernel
    name: Triton kernels, and this package's C++ ops)."""

    ops: Counter = field(default_factory=Counter)
    launches: Counter = field(default_factory=Counter)
    # Inside a Triton launch: the interpreter copies the arguments with PyTorch ops that a GPU launch does not run.
    in_launch: bool = False

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def num_launches(self) -> int:
        return sum(self.launches.values())

    def __str__(self) -> str:
        return f"{self.num_ops} ops + {self.num_launches} launches"


class _Counter(TorchDispatchMode):
    def __init__(self, cost: HostCost) -> None:
        super().__init__()
        self.cost = cost

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace = func.namespace
        name = func.overloadpacket.__name__
        kwargs = kwargs or {}
        if namespace == "torch_medloss":
            python_op = _python_ops().get(f"torch_medloss::{name}")
            if python_op is not None:
                # A Triton op's body is Python: run it with this mode on again, so that the PyTorch ops inside it
                # (a zeros for the last-program tickets, say) are counted too, and its launches by the hook.
                with self:
                    return python_op._init_fn(*args, **kwargs)
            self.cost.launches[f"torch_medloss::{name}"] += 1  # a C++ op: its kernels are out of sight
        elif not (self.cost.in_launch or func.is_view or name in _FREE or name.startswith("_has_")):
            self.cost.ops[f"{namespace}::{name}"] += 1
        return func(*args, **kwargs)


def _python_ops() -> dict:
    """The ops defined in Python (torch.library.custom_op / triton_op), by qualified name."""
    from torch._library import custom_ops

    return custom_ops.OPDEFS


@contextlib.contextmanager
def count_host_cost():
    """``with count_host_cost() as cost: ...``: the ops and launches of the block, in ``cost``."""
    cost = HostCost()
    with _triton_launch_hook(cost), _Counter(cost):
        yield cost


@contextlib.contextmanager
def _triton_launch_hook(cost: HostCost):
    """Count every Triton launch, compiled (JITFunction.run) or interpreted (InterpretedFunction.run)."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield
        return
    patched = []
    for owner in (jit.JITFunction, interpreter.InterpretedFunction):
        original = owner.run

        def run(self, *args, _original=original, **kwargs):
            cost.launches[getattr(getattr(self, "fn", None), "__name__", "triton kernel")] += 1
            cost.in_launch = True
            try:
                return _original(self, *args, **kwargs)
            finally:
                cost.in_launch = False

        owner.run = run
        patched.append((owner, original))
    try:
        yield
    finally:
        for owner, original in patched:
            owner.run = original


def loss_host_cost(module: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> HostCost:
    """The host cost of one forward and backward of ``module`` (after one warm-up call, which may build)."""
    leaf = logits.detach().clone().requires_grad_(True)
    warm = module(leaf, labels)
    warm.backward(torch.ones_like(warm) if warm.ndim else None)
    leaf.grad = None
    with count_host_cost() as cost:
        loss = module(leaf, labels)
        # A scalar loss's backward starts from autograd's ones_like, part of every training step; "none" from ones.
        loss.backward(torch.ones_like(loss) if loss.ndim else None)
    return cost
