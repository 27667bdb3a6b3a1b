"""Receptive field and rule checks for the networks (the model tests hold every registered net to them)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def _positive_copy(model: nn.Module) -> nn.Module:
    """A copy whose every path passes signal: positive weights, identity BatchNorm, eval mode (no dropout).

    With these the gradient of an output w.r.t. the input is positive exactly on the output's receptive field.
    """
    probe = copy.deepcopy(model).eval().double()
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.fill_(0.0)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()  # running statistics 0 and 1: the identity in eval mode
    return probe


def _global_pool(model: nn.Module) -> nn.Module:
    pools = [m for m in model.modules() if isinstance(m, nn.AvgPool2d | nn.AdaptiveAvgPool2d)]
    if not pools:
        raise ValueError("model has no average pool; cannot find the feature map it pools")
    return pools[-1]


def feature_receptive_field(model: nn.Module, size: int = 32) -> int:
    """Side, in input pixels, of the receptive field of the centre unit of the feature map that the net's last
    average pool reduces (what one spatial position 'sees' before global pooling). Measured on a large input so
    the image border does not truncate it."""
    probe = _positive_copy(model)
    pool = _global_pool(probe)
    captured: list[torch.Tensor] = []
    handle = pool.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    big = 4 * size
    x = torch.ones(1, 3, big, big, dtype=torch.double, requires_grad=True)
    try:
        probe(x)
    except RuntimeError:
        pass  # a fixed-size pool after the hooked input may not fit the big input; the hook already fired
    finally:
        handle.remove()
    fmap = captured[0]
    h, w = fmap.shape[2:]
    (grad,) = torch.autograd.grad(fmap[0, :, h // 2, w // 2].sum(), x)
    support = (grad[0].abs().sum(0) > 0).nonzero()
    return int(max(support[:, 0].max() - support[:, 0].min(), support[:, 1].max() - support[:, 1].min()) + 1)


def output_coverage(model: nn.Module, size: int = 32) -> float:
    """Fraction of the size x size input pixels that influence the logits."""
    probe = _positive_copy(model)
    x = torch.ones(1, 3, size, size, dtype=torch.double, requires_grad=True)
    (grad,) = torch.autograd.grad(probe(x)[0].sum(), x)
    return float((grad[0].abs().sum(0) > 0).double().mean())


def uses(model: nn.Module) -> dict[str, bool]:
    """Which of the seed's rules' building blocks a net uses."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return {
        "depthwise": any(m.groups > 1 and m.groups == m.in_channels for m in convs),
        "dilated": any(max(m.dilation) > 1 for m in convs),
        "maxpool": any(isinstance(m, nn.MaxPool2d | nn.AdaptiveMaxPool2d) for m in model.modules()),
    }
