"""Shared test helpers: value-and-gradient comparison under one upstream gradient."""

import torch


def value_and_grad(loss_fn, input, target, upstream=None, scale=1.0):
    """Loss value and d(scale * <upstream, loss>)/d(input) for a fresh leaf copy of ``input``."""
    leaf = input.detach().clone().requires_grad_(True)
    value = loss_fn(leaf, target)
    weighted = scale * (value * upstream).sum() if upstream is not None else scale * value.sum()
    (grad,) = torch.autograd.grad(weighted, leaf, allow_unused=True)
    return value.detach(), (torch.zeros_like(leaf) if grad is None else grad)


def assert_same_loss(ours, theirs, input, target, rtol, atol, upstream_seed=1):
    """Same value, shape and gradient (under a random upstream gradient, and with the loss scaled by 2)."""
    ref_value, _ = value_and_grad(theirs, input, target)
    generator = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(ref_value.shape, generator=generator, dtype=torch.float64).to(ref_value.dtype)
    for scale in (1.0, 2.0):
        expected, expected_grad = value_and_grad(theirs, input, target, upstream, scale)
        value, grad = value_and_grad(ours, input, target, upstream, scale)
        assert value.shape == expected.shape, f"shape {tuple(value.shape)} != {tuple(expected.shape)}"
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=rtol, atol=atol)
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)
