"""Tensor parallelism layer by layer, on tiny random models of every architecture (with head counts
that split) and on quantized checkpoints (AWQ, GPTQ, W8A8) written by tests/quant_factory.py.

1. Shards: each rank's layers, loaded alone, hold exactly the slices of the whole model's weights
   that the split rules give (checked on the effective weight, the layer applied to an identity
   matrix, so dense and quantized layouts are judged alike), for tp 2 and 4.
2. Logits: the ranks run as processes over gloo; a fixed schedule of prefill chunks, mixed steps and
   batched decodes gives the same logits at tp 2 as at tp 1. Tolerance 1e-4 as in
   test_models_vs_hf.py: tensor parallelism only changes summation order (a row-parallel matmul is
   two partial sums added), float32 noise of ~1e-6; the same run with the row-parallel all-reduce
   left out differs by far more, so the comparison does catch a broken split.
3. Refusals: what cannot be split is refused naming the value and the tp values that work.
"""
from __future__ import annotations

import pytest
import torch

from model_factory import make_hf_model, save_tiny_tokenizer, write_internlm2_from_llama
from quant_factory import write_awq, write_gptq, write_w8a8
from tp_helpers import SoloRank, run_ranks, tp1_logits
from tidemind.layers.context import BuildContext
from tidemind.layers.embedding import VocabParallelTable
from tidemind.layers.linear import Linear, MergedLinear, QKVLinear
from tidemind.layers.parallel import TPError
from tidemind.loader import CheckpointError, load_model
from tidemind.loader.checkpoint import check_tensor_parallel

ATOL = 1e-4
CPU = torch.device("cpu")
TOKENS = torch.randint(3, 250, (20,), generator=torch.Generator().manual_seed(3)).tolist()


def _models(root):
    """{name: model dir}: every architecture (gemma3 with one kv head: replicated at tp 2; mistral
    with a vocabulary of 251, padded on the last rank), and llama quantized three ways. Group size 8
    divides every row-parallel shard at tp 2 and 4 (o_proj's and down_proj's 96 / 4 input features)."""
    dirs = {}
    for arch, overrides in (("llama", {}), ("mistral", {"vocab_size": 251}), ("qwen2", {})):
        make_hf_model(arch, str(root / arch), seed=1, **overrides)
        dirs[arch] = str(root / arch)
    make_hf_model("gemma3", str(root / "gemma3"), seed=1, num_key_value_heads=1)
    dirs["gemma3"] = str(root / "gemma3")
    llama = make_hf_model("llama", str(root / "plain"), seed=2, head_dim=None, mlp_bias=False)
    write_internlm2_from_llama(llama, str(root / "internlm2"))
    dirs["internlm2"] = str(root / "internlm2")
    for name, write in (("awq", lambda m, p: write_awq(m, p, group=8)),
                        ("gptq", lambda m, p: write_gptq(m, p, group=8)), ("w8a8", write_w8a8)):
        hf = make_hf_model("llama", str(root / f"{name}-src"), seed=4, attention_bias=False, mlp_bias=False)
        write(hf, str(root / name))
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _models(tmp_path_factory.mktemp("tp-models"))


# ---- 1. shards ------------------------------------------------------------------------------------
def _effective(layer: Linear) -> torch.Tensor:
    """W [out, in] as the layer applies it (dequantized, whatever its layout)."""
    eye = torch.eye(layer.input_size)
    with torch.no_grad():
        return layer.linear_method.apply(layer, eye, None).t().float()


def _expected_rows(name: str, whole: Linear, rank: int, size: int) -> torch.Tensor:
    """Output-row indices of the whole layer that rank `rank` of `size` holds (column-parallel)."""
    if isinstance(whole, QKVLinear):
        heads, kv, dim = whole.num_heads, whole.num_kv_heads, whole.head_dim
        q = torch.arange(rank * heads // size * dim, (rank + 1) * heads // size * dim)
        kv_first, kv_count = ((rank * kv // size, kv // size) if kv % size == 0 else (rank * kv // size, 1))
        k = torch.arange(kv_first * dim, (kv_first + kv_count) * dim) + heads * dim
        return torch.cat([q, k, k + kv * dim])
    shard = [torch.arange(rank * s // size, (rank + 1) * s // size) + sum(whole.output_sizes[:i])
             for i, s in enumerate(whole.output_sizes)]
    return torch.cat(shard)


def _check_rank(whole_model, rank_model, rank: int, size: int) -> int:
    """Compare every parameter-holding module of one rank with the whole model's; returns how many
    modules were compared."""
    whole_modules = dict(whole_model.named_modules())
    checked = 0
    for name, module in rank_model.named_modules():
        whole = whole_modules[name]
        if isinstance(module, Linear):
            expected = _effective(whole)
            if isinstance(module, MergedLinear):
                expected = expected[_expected_rows(name, whole, rank, size)]
            elif module.parallel == "row":
                cols = whole.input_size // size
                expected = expected[:, rank * cols:(rank + 1) * cols]
            assert torch.allclose(_effective(module), expected, atol=1e-6), name
            if module.bias is not None:
                bias = whole.bias.data if module.parallel == "row" else \
                    whole.bias.data[_expected_rows(name, whole, rank, size)]
                assert torch.equal(module.bias.data, bias), f"{name}.bias"
        elif isinstance(module, VocabParallelTable) and "weight" in module._parameters:
            rows = module.rows_per_rank
            table = whole.weight.data[rank * rows:(rank + 1) * rows]
            assert torch.equal(module.weight.data[:len(table)], table), name
            assert not module.weight.data[len(table):].any(), f"{name}: padding rows must be zero"
        elif list(module.parameters(recurse=False)):  # norms: whole on every rank
            for pname, param in module.named_parameters(recurse=False):
                assert torch.equal(param.data, getattr(whole, pname).data), f"{name}.{pname}"
        else:
            continue
        checked += 1
    return checked


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma3", "internlm2", "awq", "gptq", "w8a8"])
def test_each_rank_holds_its_slice_of_every_weight(models, name, size):
    if name == "gemma3" and size == 4:
        pytest.skip("4 heads over 4 ranks with one kv head: covered by llama at tp 4 (2 kv heads replicated)")
    whole, _ = load_model(models[name], torch.float32, CPU)
    expected_modules = sum(1 for m in whole.modules() if list(m.parameters(recurse=False)))
    for rank in range(size):
        part, _ = load_model(models[name], torch.float32, CPU, BuildContext(tp_group=SoloRank(rank, size)))
        assert _check_rank(whole, part, rank, size) == expected_modules


def test_a_pre_fused_directory_loads_sharded(models, tmp_path):
    from tidemind.convert import convert

    save_tiny_tokenizer(models["llama"])  # convert copies the tokenizer, so it refuses a directory without one
    convert(models["llama"], str(tmp_path / "fused"), "float32")
    whole, _ = load_model(models["llama"], torch.float32, CPU)
    for rank in range(2):
        part, _ = load_model(str(tmp_path / "fused"), torch.float32, CPU, BuildContext(tp_group=SoloRank(rank, 2)))
        assert _check_rank(whole, part, rank, 2) > 0


# ---- 2. logits over real ranks --------------------------------------------------------------------
def test_tp2_logits_equal_tp1_for_every_architecture_and_quantization(models, tmp_path):
    names = list(models)
    jobs = [(name, models[name], "") for name in names] + [("broken", models["llama"], "no_row_reduce")]
    got = run_ranks(2, jobs, TOKENS, str(tmp_path))
    for name in names:
        expected = tp1_logits(models[name], TOKENS)
        diff = (got[name] - expected).abs().max().item()
        assert diff < ATOL, f"{name}: max |logit diff| tp 2 vs tp 1 = {diff:.2e}"
        assert torch.equal(got[name].argmax(-1), expected.argmax(-1)), name
    broken = (got["broken"] - tp1_logits(models["llama"], TOKENS)).abs().max().item()
    assert broken > 100 * ATOL, f"without the row-parallel all-reduce the logits moved only {broken:.2e}"


# ---- 3. refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, tp, message", [
    ({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16, "hidden_size": 96}, 4,
     "num_attention_heads=6 is not divisible by tp=4"),
    ({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 16, "hidden_size": 96}, 2,
     "num_key_value_heads=3 can neither be split over tp=2 ranks nor replicated evenly"),
    ({"intermediate_size": 90}, 4, "intermediate_size=90 is not divisible by tp=4"),
])
def test_a_model_that_does_not_split_is_refused_naming_why(tmp_path, overrides, tp, message):
    make_hf_model("llama", str(tmp_path), seed=1, **overrides)
    with pytest.raises(CheckpointError, match=message):
        check_tensor_parallel(str(tmp_path), tp)


def test_a_group_that_straddles_ranks_is_refused(tmp_path):
    # group 32: o_proj / down_proj hold 96 / 2 = 48 input features per rank, not a multiple of 32
    hf = make_hf_model("llama", str(tmp_path / "src"), seed=1, attention_bias=False, mlp_bias=False)
    write_awq(hf, str(tmp_path / "awq"), group=32)
    check_tensor_parallel(str(tmp_path / "awq"), 1)
    with pytest.raises(CheckpointError,
                       match=r"at tp=2 each rank holds 48 of the layer's 96 input features .* group size 32 "
                             r"does not divide the layer's 48 input features"):
        check_tensor_parallel(str(tmp_path / "awq"), 2)


def test_act_order_gptq_cannot_split_row_parallel_layers(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "src"), seed=1, attention_bias=False, mlp_bias=False)
    write_gptq(hf, str(tmp_path / "gptq"), group=16, act_order=True)
    with pytest.raises(TPError, match="act-order"):
        load_model(str(tmp_path / "gptq"), torch.float32, CPU, BuildContext(tp_group=SoloRank(1, 2)))
