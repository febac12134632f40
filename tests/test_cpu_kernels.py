"""The CPU kernels (tidemind/kernels/cpu) against their torch definitions, for every instruction-set
variant this CPU can run (avx512_vnni, avx2, scalar), on odd shapes.

Quantized linear layers are checked twice: against the exact sum they define on the quantized
activations (kernels/cpu/reference.py, in float64; the tolerance is float32 rounding of those
terms), and against dequantize-then-matmul in float32 within the bound that rounding activations
to int8 allows (reference.rounding_bound), so a wrong scale, nibble or tile order fails either way.
"""
from __future__ import annotations

import pytest
import torch

from tidemind.kernels import reference as torch_ref
from tidemind.kernels.cpu import reference as qref
from tidemind.kernels.cpu.build import CPUKernelBuildError
from tidemind.kernels.cpu.qformat import choose_format

try:
    from tidemind.kernels.cpu import library
    ISAS = library.supported_isas()
except CPUKernelBuildError as exc:  # no C compiler here: the engine falls back to torch
    pytest.skip(f"CPU kernels unavailable: {exc}", allow_module_level=True)


@pytest.fixture(params=ISAS)
def kernels(request):
    return library.kernels_for(request.param)


def _weight(n: int, k: int, kind: str, gen: torch.Generator):
    """(q, d, m) shaped like a decoded GGUF tensor of `kind` (see loader/gguf_blocks.py)."""
    group = 16 if kind == "q6_k" else 32
    d = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.001)
    if kind in ("q4_1", "q4_0", "q8_0"):
        d = d.half().float()  # legacy types: half scales
    m = torch.zeros_like(d)
    if kind == "q4_1":
        q = torch.randint(0, 16, (n, k), generator=gen)
        m = (torch.randn(n, k // group, generator=gen) * 0.05).half().float()
    elif kind == "q4_k":
        q = torch.randint(0, 16, (n, k), generator=gen)
        m = -torch.rand(n, k // group, generator=gen) * 0.05
    elif kind == "q4_0":
        q = torch.randint(-8, 8, (n, k), generator=gen)
    elif kind == "q6_k":
        q = torch.randint(-32, 32, (n, k), generator=gen)
    else:
        q = torch.randint(-128, 128, (n, k), generator=gen)
    return q.to(torch.int8), d, m


KINDS = ("q4_0", "q4_1", "q4_k", "q8_0", "q6_k")


def test_choose_format_is_exact_and_compact():
    gen = torch.Generator().manual_seed(0)
    expect = {"q4_0": (4, 32, True), "q4_1": (4, 32, True), "q4_k": (4, 32, False), "q8_0": (8, 32, True),
              "q6_k": (8, 16, False)}
    for kind in KINDS:
        q, d, m = _weight(21, 64, kind, gen)
        fmt = choose_format(q, d, m)
        assert (fmt.bits, fmt.group, fmt.scale_f16) == expect[kind], kind
        assert torch.equal(qref.dequantize(fmt.q, fmt.d, fmt.m), qref.dequantize(q, d, m)), kind


def test_choose_format_merges_equal_16_groups():
    gen = torch.Generator().manual_seed(1)
    q, d, m = _weight(5, 64, "q4_1", gen)  # group 32, written as group 16 the way a merged layer stores it
    fmt = choose_format(q, d.repeat_interleave(2, 1), m.repeat_interleave(2, 1))
    assert (fmt.bits, fmt.group) == (4, 32)
    assert torch.equal(fmt.d, d)


def test_quantize_rows_matches_definition(kernels):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 96, generator=gen) * torch.rand(7, 1, generator=gen) * 10
    x[3, 32:64] = 0  # a zero block
    x[5, :32] = torch.arange(32) - 15.5  # amax 127 below: ties at .5 round to even, as torch.round does
    x[5, 0] = 127.0
    xq, dx, sx = kernels.quantize_rows(x)
    rq, rdx, rsx = qref.quantize_rows(x)
    assert torch.equal(xq, rq)
    torch.testing.assert_close(dx, rdx, rtol=1e-6, atol=0)
    torch.testing.assert_close(sx, rsx, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, 3, 6, 9])
def test_qlinear_matches_definition(kernels, kind, rows):
    gen = torch.Generator().manual_seed(hash((kind, rows)) % 1000)
    n, k = 37, 160  # a last tile of 5 rows; 5 blocks of 32
    q, d, m = _weight(n, k, kind, gen)
    fmt = choose_format(q, d, m)
    w = kernels.pack(fmt)
    x = torch.randn(rows, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    y = kernels.qlinear(w, x, bias)
    xq, dx, sx = qref.quantize_rows(x)
    exact, scale = qref.qlinear_terms(fmt.q, fmt.d, fmt.m, xq, dx, sx)
    err = (y.double() - bias.double() - exact).abs()
    assert (err <= 2e-6 * scale + 1e-6).all(), f"{kind}: max error {err.max():.3g}"
    dense = x @ qref.dequantize(q, d, m).t() + bias
    assert ((y - dense).abs().double() <= qref.rounding_bound(qref.dequantize(q, d, m), x) * 1.001 + 1e-4).all()


def test_qlinear_many_rows_and_column_slices(kernels):
    """More rows than one pass over the weights holds (MCHUNK = 256), written into columns of a
    wider output as merged layers of mixed formats do."""
    gen = torch.Generator().manual_seed(3)
    n, k, rows = 19, 64, 261
    q, d, m = _weight(n, k, "q4_1", gen)
    w = kernels.pack(choose_format(q, d, m))
    x = torch.randn(rows, k, generator=gen)
    out = torch.full((rows, n + 7), 7.0)
    kernels.qlinear(w, x, out=out[:, 3:3 + n])
    assert (out[:, :3] == 7).all() and (out[:, 3 + n:] == 7).all()
    solo = torch.cat([kernels.qlinear(w, x[i:i + 1]) for i in (0, 100, 260)])
    assert torch.equal(out[[0, 100, 260], 3:3 + n], solo), "a row's result depends on its batch"
    dense = x @ qref.dequantize(q, d, m).t()
    assert ((out[:, 3:3 + n] - dense).abs().double() <= qref.rounding_bound(qref.dequantize(q, d, m), x) + 1e-4).all()


@pytest.mark.parametrize("kind", ("q4_1", "q8_0", "q6_k"))
def test_qrows_dequantizes_exactly(kernels, kind):
    gen = torch.Generator().manual_seed(4)
    q, d, m = _weight(45, 96, kind, gen)
    w = kernels.pack(choose_format(q, d, m))
    ids = torch.tensor([0, 44, 17, 17, 31])
    assert torch.equal(kernels.qrows(w, ids), qref.dequantize(q, d, m)[ids])


def test_layer_ops_match_reference(kernels):
    gen = torch.Generator().manual_seed(5)
    x, res, weight = (torch.randn(5, 200, generator=gen), torch.randn(5, 200, generator=gen),
                      torch.randn(200, generator=gen))
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5, 1.0), torch_ref.rms_norm(x, weight, 1e-5, 1.0),
                               rtol=1e-5, atol=1e-5)
    want = torch_ref.add_rms_norm(x, res, weight, 1e-6)
    got = kernels.add_rms_norm(x.clone(), res.clone(), weight, 1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(3, 2 * 77, generator=gen) * 4
    torch.testing.assert_close(kernels.silu_and_mul(gate_up), torch_ref.silu_and_mul(gate_up), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernels.gelu_tanh_and_mul(gate_up), torch_ref.gelu_tanh_and_mul(gate_up),
                               rtol=1e-5, atol=1e-5)


def test_rope_matches_reference(kernels):
    gen = torch.Generator().manual_seed(6)
    head_dim, heads, kv_heads = 48, 3, 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cache = torch_ref.build_cos_sin_cache(inv_freq, 64)
    positions = torch.tensor([0, 5, 63, 17])
    q, k = torch.randn(4, heads * head_dim, generator=gen), torch.randn(4, kv_heads * head_dim, generator=gen)
    want_q, want_k = torch_ref.rotary_embedding_cached(q.clone(), k.clone(), positions, cache)
    got_q, got_k = kernels.rope(q.clone(), k.clone(), positions, cache)
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window, heads", [(None, 6), (6, 6), (None, 20)])
def test_cpu_attention_backend_matches_reference(window, heads):
    """Decodes and prefill chunks (a whole prompt, a chunk after cached tokens) in one step, grouped
    query heads (3 a key head; 10, more than the kernel takes at once), blocks scattered over the
    cache; the new keys are written by the call itself."""
    from tidemind.attention.base import AttentionSpec, layout_from_lists
    from tidemind.attention.cpu_backend import CPUAttentionBackend
    from tidemind.attention.kv_cache import LayerKVCache
    from tidemind.attention.reference import ReferenceAttentionBackend

    gen = torch.Generator().manual_seed(7)
    kv_heads, head_dim, block_size = 2, 40, 4
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim ** -0.5, window)
    query_lens, seq_lens = [1, 1, 9, 5], [13, 3, 9, 17]
    free = torch.randperm(40, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in seq_lens]
    layout = layout_from_lists(query_lens, seq_lens, tables, block_size, torch.device("cpu"))
    t = sum(query_lens)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    views = (q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim))
    cache = torch.randn(2, 40, block_size, kv_heads, head_dim, generator=gen)
    outs = []
    for backend in (ReferenceAttentionBackend(), CPUAttentionBackend()):
        kv = LayerKVCache(cache.clone())
        outs.append((backend.forward(spec, *views, kv, backend.build_metadata(layout)), kv.data))
    (want, want_cache), (got, got_cache) = outs
    assert torch.equal(got_cache, want_cache)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("head_dim", [40, 64, 136])
def test_paged_attention_every_isa(kernels, head_dim):
    """Each ISA's attention kernel (SIMD dot products and value sums, their tails at head_dim 40
    and 136) against the torch reference, over more keys than one chunk, 4 query heads a key head."""
    from tidemind.attention.base import AttentionSpec, layout_from_lists
    from tidemind.attention.cpu_backend import CPUAttentionBackend
    from tidemind.attention.kv_cache import LayerKVCache
    from tidemind.attention.reference import ReferenceAttentionBackend

    gen = torch.Generator().manual_seed(head_dim)
    heads, kv_heads, block_size = 8, 2, 16
    spec = AttentionSpec(heads, kv_heads, head_dim, head_dim ** -0.5, None)
    query_lens, seq_lens = [1, 3], [75, 40]
    tables = [[0, 5, 2, 7, 1], [3, 6, 4]]
    layout = layout_from_lists(query_lens, seq_lens, tables, block_size, torch.device("cpu"))
    t = sum(query_lens)
    q = torch.randn(t, heads, head_dim, generator=gen)
    k, v = torch.randn(t, kv_heads, head_dim, generator=gen), torch.randn(t, kv_heads, head_dim, generator=gen)
    cache = torch.randn(2, 8, block_size, kv_heads, head_dim, generator=gen)
    reference = ReferenceAttentionBackend()
    want = reference.forward(spec, q, k, v, LayerKVCache(cache.clone()), reference.build_metadata(layout))
    backend = CPUAttentionBackend()
    got = kernels.paged_attention(q, k, v, cache.clone(), backend.build_metadata(layout).args, spec.scale, 0)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("window", [0, 90])
def test_paged_attention_gives_a_position_the_same_bits_in_a_decode_and_in_a_prefill(kernels, window):
    """A batch-1 decode is split over the threads by key segments and merged by the caller; a long
    prefill runs a task per row. The last row's result must not depend on which: the same bits
    (a recompute after preemption, or a prompt cached by another request, must not change a token).
    Two threads, 200 keys (four segments; with the window, the first one starts mid-segment)."""
    from tidemind.attention.base import layout_from_lists
    from tidemind.attention.cpu_backend import CPUAttentionBackend

    gen = torch.Generator().manual_seed(11)
    heads, kv_heads, head_dim, block_size, n = 12, 3, 64, 16, 200
    blocks = -(-n // block_size)
    table = torch.randperm(blocks + 3, generator=gen)[:blocks].tolist()
    q = torch.randn(n, heads, head_dim, generator=gen)
    k, v = torch.randn(n, kv_heads, head_dim, generator=gen), torch.randn(n, kv_heads, head_dim, generator=gen)
    backend = CPUAttentionBackend()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for rows in (60, 1):  # a chunk of 60 rows after 140 cached keys; the last row alone
            cache = torch.zeros(2, blocks + 3, block_size, kv_heads, head_dim)
            layout = layout_from_lists([n - rows], [n - rows], [table], block_size, torch.device("cpu"))
            kernels.paged_attention(q[:n - rows], k[:n - rows], v[:n - rows], cache,
                                    backend.build_metadata(layout).args, head_dim ** -0.5, window)
            layout = layout_from_lists([rows], [n], [table], block_size, torch.device("cpu"))
            results.append(kernels.paged_attention(q[n - rows:], k[n - rows:], v[n - rows:], cache,
                                                   backend.build_metadata(layout).args, head_dim ** -0.5, window))
    finally:
        torch.set_num_threads(threads)
    prefill, decode = results
    assert torch.equal(prefill[-1], decode[0]), float((prefill[-1] - decode[0]).abs().max())


def test_argmax_rows_answers_as_torch_ties_nan_and_infinities_included(kernels):
    """The greedy choice of each row (kernels/cpu argmax_rows) against torch.argmax: ties resolve to
    the first index, a NaN wins (its first index), a row of -inf picks 0; rows of a wider tensor;
    enough values for the pool to split the rows over two threads."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 49200, generator=gen)[:, :49152]
    logits[1, [7, 300, 40000]] = 50.0  # a three-way tie
    logits[2, [11, 9000]] = float("nan")
    logits[2, 5] = 1e30
    logits[3] = float("-inf")
    logits[4, -1] = float("inf")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = kernels.argmax_rows(logits)
        single = kernels.argmax_rows(logits[5:6])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert got[1] == 7 and got[2] == 11 and got[3] == 0 and got[4] == 49151
    assert torch.equal(single, logits[5:6].argmax(dim=-1))
