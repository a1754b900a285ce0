"""The guard around oneDNN's strided 1x1 weight-gradient bug (adasap.method.onednn_guard)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from adasap.method.onednn_guard import guard_strided_pointwise_convs, needs_guard


@pytest.mark.parametrize(
    "layer,guarded",
    [
        (nn.Conv2d(4, 16, 1, stride=2, bias=False), True),  # a pruned ResNet shortcut
        (nn.Conv2d(15, 32, 1, stride=(1, 2)), True),
        (nn.Conv2d(16, 32, 1, stride=2), False),  # a whole channel block
        (nn.Conv2d(4, 16, 1, stride=1), False),  # unit stride: another kernel
        (nn.Conv2d(4, 16, 3, stride=2), False),
        (nn.Conv2d(32, 32, 1, stride=2, groups=4), True),  # 8 input channels per group
        (nn.Linear(4, 16), False),
    ],
)
def test_which_layers_need_the_guard(layer, guarded):
    assert needs_guard(layer) is guarded


def test_the_guard_is_installed_once_per_layer():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 16, 1))
    assert guard_strided_pointwise_convs(model) == [model[1]]
    guard_strided_pointwise_convs(model)
    assert len(model[1]._forward_pre_hooks) == 1 and len(model[1]._forward_hooks) == 1
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_a_guarded_layer_computes_contiguously_and_answers_in_its_inputs_layout(memory_format):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, 1, stride=2, bias=False)
    x = torch.randn(2, 4, 6, 6)
    expected = layer(x)  # contiguous throughout
    layer.to(memory_format=memory_format)
    guard_strided_pointwise_convs(layer)
    output = layer(x.contiguous(memory_format=memory_format))
    assert layer.weight.is_contiguous()  # computed in the contiguous layout ...
    assert output.is_contiguous(memory_format=memory_format)  # ... the rest of the model is not
    assert torch.equal(output, expected)  # a layout change is a copy, the same values


# In a separate process: without the guard the bug corrupts memory (one thread) and would take
# the test run down with it.
GRADIENTS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from adasap.method.onednn_guard import guard_strided_pointwise_convs
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for cin in range(2, 16):
        reference = nn.Conv2d(cin, 16, 1, stride=2, bias=False)
        x = torch.randn(32, cin, 12, 12, requires_grad=True)
        reference(x).square().mean().backward()
        layer = nn.Conv2d(cin, 16, 1, stride=2, bias=False)
        layer.load_state_dict(reference.state_dict())
        layer.to(memory_format=torch.channels_last)
        guard_strided_pointwise_convs(layer)
        x_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        output = layer(x_last)
        assert output.is_contiguous(memory_format=torch.channels_last), cin
        output.square().mean().backward()
        assert torch.allclose(layer.weight.grad, reference.weight.grad, atol=1e-6), cin
        assert torch.allclose(x_last.grad, x.grad, atol=1e-6), cin
    print("same gradients")
    """
)


def test_guarded_layers_get_the_right_gradients_and_layout_in_channels_last():
    done = subprocess.run(
        [sys.executable, "-c", GRADIENTS], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "same gradients" in done.stdout, done.stderr[-2000:]
