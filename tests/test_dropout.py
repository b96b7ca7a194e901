"""latentlm.nn.Dropout: torch's dropout distribution with a cheaper CPU mask."""

import pytest
import torch
from torch import nn

from latentlm.nn.dropout import Dropout, dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_each_unit_with_probability_one_minus_p_and_rescales(dtype):
    torch.manual_seed(0)
    p, n = 0.3, 200_000
    x = torch.ones(n, dtype=dtype, requires_grad=True)
    y = dropout(x, p)
    kept = y != 0
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)  # within 4 standard errors
    torch.testing.assert_close(y[kept].float(), torch.full((int(kept.sum()),), 1 / (1 - p)), rtol=1e-2, atol=0)
    y.float().sum().backward()
    torch.testing.assert_close(x.grad.float(), y.detach().float())  # the gradient is the scaled mask
    assert abs(y.double().mean().item() - 1.0) < 0.01  # unbiased


def test_module_is_a_torch_dropout_and_is_the_identity_in_eval_mode():
    layer = Dropout(0.5)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.5
    x = torch.randn(4, 5)
    assert not torch.equal(layer(x), x)  # training by default
    layer.eval()
    assert layer(x) is x
    assert Dropout(0.0)(x) is x
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    torch.manual_seed(1)
    a = Dropout(0.5)(x)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.5)(x), a)  # seeded like the rest of torch
