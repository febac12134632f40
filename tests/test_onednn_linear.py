"""The oneDNN-packed dense path: the row bucketing that bounds oneDNN's per-shape kernel cache
(and so a CPU server's RSS) must never change a result."""
import pytest
import torch

from tidemind.layers.linear import onednn_linear, onednn_rows

pytestmark = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                     and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                reason="needs a torch built with oneDNN")


def test_rows_are_exact_for_decode_batches_and_bucketed_beyond():
    assert [onednn_rows(n) for n in (1, 2, 7, 16)] == [1, 2, 7, 16]
    assert [onednn_rows(n) for n in (17, 32, 33, 256, 257, 320, 2000)] == [32, 32, 48, 256, 320, 320, 2048]
    assert all(onednn_rows(n) >= n for n in range(1, 3000))
    assert len({onednn_rows(n) for n in range(1, 2049)}) == 16 + 15 + 28  # shapes a server can ever compile


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40, 255, 257, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bucketed_matmul_equals_f_linear_on_the_real_rows(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(72, 40), torch.randn(rows, 40)
    bias = torch.randn(72) if with_bias else None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
    out = onednn_linear(x, packed, bias)
    assert out.shape == (rows, 72)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
