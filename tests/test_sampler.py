"""The sampler against straightforward per-row references written here (CPU; a CUDA check is marked gpu).

References work in float64 on Python lists, one row at a time, from the definitions in the brief:
bans -> min_new_tokens -> penalties -> greedy argmax, or temperature -> top_k -> top_p -> min_p.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tidemind.config import GenerationConfig
from tidemind.core.sampling_params import SamplingParams
from tidemind.runner import sampler as sampler_module
from tidemind.runner.logits_processors import apply_penalties, process_logits
from tidemind.runner.logits_processors import SamplingInputs
from tidemind.runner.sampler import (Sampler, SamplerOutput, gumbel_noise, hash32, hash32_tensor, noise_keys,
                                     noise_keys_tensor, seed_words)

NEG_INF = float("-inf")


def params(cfg: GenerationConfig, seed: int = 0, stop=(), bad_words=()) -> SamplingParams:
    return SamplingParams.from_generation_config(cfg, seed, frozenset(stop), [list(w) for w in bad_words])


def make(seed=0, prompt=(), output=(), stop=(), bad_words=(), **config) -> SamplingInputs:
    return SamplingInputs(params(GenerationConfig(**config), seed, stop, bad_words), list(prompt), list(output))


def run(logits: torch.Tensor, inputs) -> SamplerOutput:
    return Sampler()(logits.clone(), inputs)  # the sampler consumes its logits


def sampled(**config) -> dict:
    config.setdefault("temperature", 1.0)
    config.setdefault("top_k", 0)
    return dict(do_sample=True, **config)


# ---------------------------------------------------------------- references (float64, per row)

def reference_processed(row, inp: SamplingInputs) -> list:
    """Steps 1-3 for one row, on a list of floats."""
    x = [float(v) for v in row]
    cfg, out = inp.params, list(inp.output_token_ids)
    for t in cfg.bad_token_ids or ():
        if t < len(x):
            x[t] = NEG_INF
    for word in cfg.bad_word_token_ids:
        if len(word) == 1 or (len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:] == list(word[:-1])):
            x[word[-1]] = NEG_INF
    if cfg.min_new_tokens and len(out) < cfg.min_new_tokens:
        for t in cfg.stop_token_ids:
            x[t] = NEG_INF
    for t in set(inp.prompt_token_ids) | set(out):
        x[t] = x[t] / cfg.repetition_penalty if x[t] > 0 else x[t] * cfg.repetition_penalty
    for t, count in Counter(out).items():
        x[t] -= cfg.presence_penalty + cfg.frequency_penalty * count
    return x


def reference_probs(row, cfg: GenerationConfig, margin: float = 1e-4) -> list:
    """The filtered, renormalized distribution of one (processed) row, float64.

    Asserts that no top_p / min_p decision is within `margin` of its boundary, so that float32 in
    the sampler cannot legitimately decide otherwise.
    """
    x = [float(v) / cfg.temperature for v in row]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = [i for i in order if x[i] > NEG_INF]
    if cfg.top_k:
        kth = x[keep[min(cfg.top_k, len(keep)) - 1]]
        keep = [i for i in keep if x[i] >= kth]  # ties at the k-th value are kept
    if cfg.top_p < 1.0:
        z = sum(math.exp(x[i]) for i in keep)
        cumulative, nucleus = 0.0, []
        for i in keep:
            if nucleus and x[i] < x[nucleus[-1]] and cumulative >= cfg.top_p:
                break
            nucleus.append(i)
            cumulative += math.exp(x[i]) / z
            assert abs(cumulative - cfg.top_p) > margin, "test logits too close to a top_p boundary"
        keep = nucleus
    if cfg.min_p > 0:
        for i in keep:
            assert abs(math.exp(x[i] - x[keep[0]]) - cfg.min_p) > margin, "too close to the min_p boundary"
        keep = [i for i in keep if math.exp(x[i] - x[keep[0]]) >= cfg.min_p]
    z = sum(math.exp(x[i]) for i in keep)
    probs = [0.0] * len(x)
    for i in keep:
        probs[i] = math.exp(x[i]) / z
    return probs


def draw_many(row: torch.Tensor, num_draws: int, **config) -> Counter:
    """num_draws samples of one logits row: distinct seeds, and two steps per seed."""
    cfg = GenerationConfig(**config)
    inputs = [SamplingInputs(params(cfg, s), [], [0] * step) for step in (0, 7) for s in range(num_draws // 2)]
    return Counter(run(row.expand(len(inputs), -1), inputs).token_ids)


def assert_matches(counts: Counter, probs: list, num_draws: int) -> None:
    # Never a token outside the support; each frequency within 5 standard deviations of its
    # probability (binomial: sqrt(p(1-p)/N) <= 0.0036 at N = 20000). Over ~100 checked frequencies
    # in this file a correct sampler fails with probability ~1e-4; the seeds are fixed, so a pass
    # stays a pass. A wrong temperature, renormalization or support moves some p by >> 0.02.
    outside = {t for t in counts if probs[t] == 0.0}
    assert not outside, f"tokens outside the support were drawn: {outside}"
    for token, p in enumerate(probs):
        freq = counts.get(token, 0) / num_draws
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / num_draws) + 1e-9, (token, freq, p)


# Twelve well-separated logits at shuffled ids (float32-exact values).
SMALL = torch.tensor([[0.0, 1.5, -3.0, 2.0, -0.75, 0.375, -2.0, 1.125, -1.25, 0.875, -0.25, 1.75]])


# ---------------------------------------------------------------- greedy, bans, min_new_tokens

def test_greedy_is_argmax_of_each_row():
    logits = torch.randn(9, 300, generator=torch.Generator().manual_seed(0))
    inputs = [make(seed=i) for i in range(8)] + [make(do_sample=True, temperature=0.0)]
    out = run(logits, inputs)
    assert out.token_ids == [max(range(300), key=lambda t: logits[r, t].item()) for r in range(9)]
    assert out.logprobs == [None] * 9


def test_bad_token_ids_and_bad_words():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    words = [[9], [5, 6, 7], [30, 31]]
    inputs = [make(bad_token_ids=[3, 4, 49, 10_000]),  # an id past the vocabulary bans nothing
              make(bad_words=words, output=[1, 5, 6]),  # [5, 6, 7] completes: 7 banned
              make(bad_words=words, output=[5, 6, 8]),  # no prefix at the end: only 9 banned
              make(bad_words=words, output=[6]),  # half a prefix: only 9
              make(bad_words=words, output=[5, 6]),  # the whole output is the prefix: 7 banned
              make(bad_words=words, output=[2, 30])]  # 31 banned
    processed = process_logits(logits.clone(), inputs)
    banned = [{3, 4, 49}, {9, 7}, {9}, {9}, {9, 7}, {9, 31}]
    for row, expected in enumerate(banned):
        assert {t for t in range(50) if processed[row, t] == NEG_INF} == expected
        assert processed[row].tolist() == reference_processed(logits[row].tolist(), inputs[row])


def test_banned_greedy_token_gives_the_next_best():
    logits = torch.tensor([[0.1, 3.0, 2.0, 1.0], [0.1, 3.0, 2.0, 1.0]])
    out = run(logits, [make(bad_token_ids=[1]), make(bad_words=[[7, 1], [2]], output=[7])])
    assert out.token_ids == [2, 3]


def test_min_new_tokens_masks_stop_ids_then_releases():
    logits = torch.tensor([[5.0, 4.0, 3.0, 1.0]])
    stop = (0, 1)
    for num_out, expected in ((0, 2), (2, 2), (3, 0), (5, 0)):
        inputs = [make(min_new_tokens=3, stop=stop, output=[3] * num_out)]
        assert run(logits, inputs).token_ids == [expected], num_out
        row = process_logits(logits.clone(), inputs)[0].tolist()
        assert row == reference_processed(logits[0].tolist(), inputs[0])
    # Sampled rows see the same mask.
    inputs = [make(seed=s, min_new_tokens=1, stop=stop, **sampled()) for s in range(200)]
    assert not {0, 1} & set(run(logits.expand(200, -1), inputs).token_ids)


# ---------------------------------------------------------------- penalties

def test_penalties_match_reference():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 40, generator=gen) * 3
    inputs = [make(repetition_penalty=1.3, prompt=[1, 2, 2, 3], output=[3, 4, 4, 4]),
              make(presence_penalty=0.7, frequency_penalty=0.3, prompt=[5, 6], output=[6, 7, 7, 8, 7]),
              make(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5,
                   prompt=[9, 10, 11], output=[11, 12, 12, 39, 0]),
              make(prompt=[1, 2, 3], output=[4, 5]),  # no penalty: untouched
              make(repetition_penalty=1.5, frequency_penalty=0.2, prompt=list(range(40)), output=[])]
    processed = apply_penalties(logits.clone(), inputs)
    for row, inp in enumerate(inputs):
        expected = torch.tensor(reference_processed(logits[row].tolist(), inp))
        torch.testing.assert_close(processed[row], expected.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(processed[3], logits[3])


def test_penalties_follow_bans_and_change_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    inputs = [make(repetition_penalty=1.2, output=[0])]  # 2.0 / 1.2 < 1.9
    assert run(logits, inputs).token_ids == [1]
    inputs = [make(frequency_penalty=1.0, bad_token_ids=[1], output=[0])]  # 2.0 - 1 = 1.0 > 0.5
    assert run(logits, inputs).token_ids == [0]
    processed = process_logits(logits.clone(), inputs)
    assert processed[0].tolist() == [1.0, NEG_INF, -1.0, 0.5]


def test_penalties_across_steps_read_the_grown_output():
    # The output grows between steps (by one or several tokens, and once it is cut and rewritten),
    # and each step must see exactly the current tokens.
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(13))
    outputs = [[], [4]]
    inputs = [make(repetition_penalty=1.5, frequency_penalty=0.4, prompt=[1, 2]),
              make(presence_penalty=1.0, prompt=[3] * 40)]
    for inp, out in zip(inputs, outputs):
        object.__setattr__(inp, "output_token_ids", out)  # the request's live list
    for step in range(40):
        if step == 25:
            outputs[0][:] = [29, 28, 29]
        processed = apply_penalties(logits.clone(), inputs)
        for row, inp in enumerate(inputs):
            expected = torch.tensor(reference_processed(logits[row].tolist(), inp)).float()
            torch.testing.assert_close(processed[row], expected, rtol=1e-6, atol=1e-6)
        outputs[0].append((step * 7) % 30)
        outputs[1].extend([(step * 3) % 11, step % 5, 17] if step % 3 else [])


# ---------------------------------------------------------------- filtering and the draw

@pytest.mark.parametrize("config", [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=1.5, top_k=4),
    dict(top_p=0.8),
    dict(temperature=0.8, top_k=6, top_p=0.7),
    dict(min_p=0.3),
    dict(temperature=1.5, top_k=5, min_p=0.5),
    dict(temperature=2.0, top_p=0.9, min_p=0.1),
], ids=str)
def test_empirical_distribution_matches_filtered_softmax(config):
    num_draws = 20000
    probs = reference_probs(SMALL[0].tolist(), GenerationConfig(**sampled(**config)))
    assert_matches(draw_many(SMALL, num_draws, **sampled(**config)), probs, num_draws)


def test_block_race_over_a_vocabulary_of_several_blocks():
    # Rows with neither top_k nor top_p draw a block first: hot tokens at block edges, a cold tail
    # spread over all blocks (the last one padded), and whole blocks banned.
    vocab, num_draws = 808, 20000
    block = sampler_module.block_size(vocab)
    assert vocab % block != 0 and vocab // block > 10
    row = torch.full((1, vocab), -3.5)
    hot = [0, block - 1, block, 2 * block - 1, 2 * block, vocab - 1]
    row[0, hot] = torch.tensor([1.0, 2.0, 0.5, 1.5, -0.5, 2.25])
    config = sampled(temperature=0.9, bad_token_ids=list(range(300, 400)))
    probs = reference_probs(reference_processed(row[0].tolist(), make(**config)), GenerationConfig(**config))
    counts = draw_many(row, num_draws, **config)
    assert_matches(counts, probs, num_draws)
    cold = sum(c for t, c in counts.items() if t not in hot) / num_draws
    p_cold = 1 - sum(probs[t] for t in hot)
    assert abs(cold - p_cold) <= 5 * math.sqrt(p_cold * (1 - p_cold) / num_draws)


@pytest.mark.parametrize("config", [
    dict(top_k=7), dict(top_k=20, top_p=0.6), dict(top_p=0.5), dict(top_p=0.95, temperature=0.7),
    dict(min_p=0.2, temperature=1.3), dict(top_k=30, top_p=0.9, min_p=0.05, temperature=1.7),
], ids=str)
def test_no_token_outside_the_support(config):
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 500, generator=gen) * 2.5  # [4, 500]: distinct values
    cfg = GenerationConfig(**sampled(**config))
    for r in range(4):
        support = {t for t, p in enumerate(reference_probs(rows[r].tolist(), cfg, margin=1e-6)) if p > 0}
        inputs = [make(seed=s, output=[1] * (s % 5), **sampled(**config)) for s in range(1500)]
        drawn = set(run(rows[r:r + 1].expand(1500, -1), inputs).token_ids)
        assert drawn <= support
        assert len(drawn) >= min(len(support), 3)


def test_ties_at_the_kth_value_are_all_kept():
    # 40 tokens share the 2nd best value: top_k=2 keeps all of them (HF semantics), more than the
    # topk(k + slack) candidates hold, which exercises the redo with more candidates.
    row = torch.full((1, 300), -5.0)
    tied = list(range(100, 140))
    row[0, tied] = 1.0
    row[0, 7] = 1.5
    inputs = [make(seed=s, **sampled(top_k=2)) for s in range(3000)]
    counts = Counter(run(row.expand(3000, -1), inputs).token_ids)
    assert set(counts) <= {7, *tied}
    assert len(set(counts) & set(tied)) == 40
    probs = reference_probs(row[0].tolist(), GenerationConfig(**sampled(top_k=2)))
    assert abs(counts[7] / 3000 - probs[7]) <= 5 * math.sqrt(probs[7] * (1 - probs[7]) / 3000)


def test_top_k_1_is_the_greedy_token():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 1000, generator=gen)
    for row in range(0, 64, 4):  # ties at the top: the lowest id wins, as in argmax
        logits[row, [row + 3, row + 100, 999]] = 50.0
    greedy = run(logits, [make() for _ in range(64)]).token_ids
    assert greedy[::4] == [row + 3 for row in range(0, 64, 4)]
    inputs = [make(seed=s, output=[2] * s, **sampled(top_k=1, temperature=3.0, top_p=0.5)) for s in range(64)]
    assert run(logits, inputs).token_ids == greedy


def test_temperature_zero_with_do_sample_is_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(5))
    inputs = [make(seed=s, do_sample=True, temperature=0.0, top_k=0) for s in range(8)]
    assert run(logits, inputs).token_ids == logits.argmax(-1).tolist()


# ---------------------------------------------------------------- seeds: reproducible and independent

SEED_CONFIGS = [sampled(top_k=40), sampled(top_k=5, top_p=0.8, min_p=0.05), sampled(top_p=0.9),
                sampled(temperature=1.3), sampled(min_p=0.1, temperature=0.7)]


def test_same_seed_same_token_alone_or_in_any_batch():
    gen = torch.Generator().manual_seed(6)
    vocab = 5000
    target_logits = torch.randn(3, vocab, generator=gen) * 2
    target_logits[2] *= 0.05  # flat: its nucleus is larger than the first candidates
    others = torch.randn(7, vocab, generator=gen) * 2
    other_inputs = [make(seed=99), make(seed=98, logprobs=3, **sampled(top_k=300)),
                    make(seed=97, repetition_penalty=1.3, prompt=[1, 2], **sampled(top_p=0.3)),
                    make(seed=96, **sampled()), make(seed=95, **sampled(top_k=2)),
                    make(seed=94, bad_words=[[1, 2]], output=[1], **sampled(top_k=1000)),
                    make(seed=93, **sampled(top_k=1))]
    for config in SEED_CONFIGS:
        for step in (0, 1, 17):
            for r in range(3):
                target = make(seed=1234 + r, output=[3] * step, **config)
                alone = run(target_logits[r:r + 1], [target]).token_ids[0]
                for position in (0, 3, 7):
                    logits = torch.cat([others[:position], target_logits[r:r + 1], others[position:]])
                    inputs = other_inputs[:position] + [target] + other_inputs[position:]
                    assert run(logits, inputs).token_ids[position] == alone, (config, step, r, position)


def test_a_redone_row_gets_the_token_of_enough_candidates(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 6000, generator=gen) * 0.2  # flat: nuclei of thousands of tokens
    inputs = [make(seed=s, **sampled(top_p=0.3 + 0.04 * s)) for s in range(16)]
    tokens = run(logits, inputs).token_ids
    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", 6000)  # the whole row at once
    assert run(logits, inputs).token_ids == tokens
    monkeypatch.setattr(sampler_module, "NUCLEUS_CANDIDATES", 300)
    monkeypatch.setattr(sampler_module, "FALLBACK_CANDIDATES", ())  # straight to the whole row
    assert run(logits, inputs).token_ids == tokens


@pytest.mark.parametrize("config", SEED_CONFIGS, ids=str)
def test_different_seeds_and_steps_give_different_tokens(config):
    logits = torch.zeros(64, 1000)  # uniform: 64 independent draws collide ~2 times
    by_seed = run(logits, [make(seed=s, **config) for s in range(64)]).token_ids
    by_step = run(logits, [make(seed=5, output=[0] * s, **config) for s in range(64)]).token_ids
    by_big_seed = run(logits, [make(seed=s << 32, **config) for s in range(64)]).token_ids
    for tokens in (by_seed, by_step, by_big_seed):
        assert len(set(tokens)) >= 56
    assert run(logits, [make(seed=s, **config) for s in range(64)]).token_ids == by_seed


def test_hash_tensor_matches_host_and_noise_is_gumbel():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF] + \
        torch.randint(0, 2 ** 32, (1000,), generator=torch.Generator().manual_seed(8)).tolist()
    assert hash32_tensor(torch.tensor(values)).tolist() == [hash32(v) for v in values]
    assert noise_keys(-1, 3) == noise_keys(2 ** 64 - 1, 3) != noise_keys(2 ** 64 - 1, 4)
    seeds_steps = [(0, 0), (1, 0), (0, 1), (-5, 7), (2 ** 40 + 3, 12), (2 ** 64 - 1, 2 ** 20), (123456789, 99)]
    on_device = noise_keys_tensor(torch.tensor([seed_words(s, t) for s, t in seeds_steps]))
    assert on_device.tolist() == [list(noise_keys(s, t)) for s, t in seeds_steps]
    keys = torch.tensor([noise_keys(s, 0) for s in range(16)])  # [16, 2]
    noise = gumbel_noise(keys, torch.arange(65536).unsqueeze(0))  # [16, 65536]
    # Standard Gumbel: mean = Euler-Mascheroni 0.5772, variance pi^2 / 6 = 1.645; over 1M samples
    # their standard errors are 0.0013 and ~0.004.
    assert abs(noise.mean().item() - 0.5772) < 0.01
    assert abs(noise.var().item() - math.pi ** 2 / 6) < 0.03
    assert torch.isfinite(noise).all()


# ---------------------------------------------------------------- logprobs and mixed batches

def test_logprobs_are_raw_log_softmax_of_chosen_and_top_tokens():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 200, generator=gen) * 2
    top = logits[1].topk(3).indices.tolist()
    inputs = [make(logprobs=5),
              make(logprobs=2, bad_token_ids=top),  # chosen (greedy after bans) is not in the top 2
              make(logprobs=0, seed=3, **sampled(top_k=20)),
              make(seed=4, **sampled(top_k=20))]
    out = run(logits, inputs)
    raw = torch.log_softmax(logits.double(), dim=-1)
    for row, n in ((0, 5), (1, 2), (2, 0)):
        entry = out.logprobs[row]
        chosen = out.token_ids[row]
        expected_ids = {chosen} | set(raw[row].topk(n).indices.tolist() if n else [])
        assert set(entry) == expected_ids
        for token, value in entry.items():
            assert value == pytest.approx(raw[row, token].item(), abs=1e-5)
    assert out.token_ids[1] not in top and len(out.logprobs[1]) == 3
    assert out.logprobs[3] is None


def test_mixed_batch_gives_each_row_what_it_gets_alone():
    gen = torch.Generator().manual_seed(10)
    vocab = 3000
    logits = torch.randn(8, vocab, generator=gen) * 2
    inputs = [make(),
              make(logprobs=4, seed=1, **sampled(top_k=50, top_p=0.9)),
              make(repetition_penalty=1.4, presence_penalty=0.5, prompt=[5, 6], output=[7, 7], logprobs=1),
              make(seed=3, frequency_penalty=0.8, output=[1, 2, 2], **sampled(top_p=0.7)),
              make(seed=4, min_p=0.2, bad_words=[[2, 9]], output=[2], **sampled(temperature=0.6)),
              make(seed=5, min_new_tokens=4, stop=(0, 11), output=[4], **sampled(top_k=3)),
              make(logprobs=20, bad_token_ids=[0, 1, 2]),
              make(seed=7, **sampled(top_k=1))]
    together = run(logits, inputs)
    for row, inp in enumerate(inputs):
        alone = run(logits[row:row + 1], [inp])
        assert together.token_ids[row] == alone.token_ids[0], row
        assert together.logprobs[row] == alone.logprobs[0], row


def test_rows_and_inputs_must_match():
    with pytest.raises(ValueError, match="one logits row per input"):
        Sampler()(torch.zeros(2, 10), [make()])


def test_half_precision_logits_are_accepted():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    inputs = [make(), make(seed=1, **sampled(top_k=5)), make(seed=2, logprobs=2, **sampled())]
    out = Sampler()(logits.clone(), inputs)
    assert out.token_ids[0] == logits[0].float().argmax().item()
    assert len(out.logprobs[2]) >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_tokens():
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(12, 32000, generator=gen) * 3
    logits[11] *= 0.05  # a flat row: its nucleus goes past the first candidates
    inputs = [make(seed=100 + i, output=[i] * i, **config) for i, config in enumerate(SEED_CONFIGS * 2)]
    inputs.append(make(logprobs=5, repetition_penalty=1.2, prompt=[1, 2, 3]))
    inputs.append(make(seed=5, **sampled(top_p=0.95)))
    cpu = run(logits, inputs)
    cuda = Sampler()(logits.cuda(), inputs)
    assert cuda.token_ids == cpu.token_ids
    for a, b in zip(cuda.logprobs, cpu.logprobs):
        assert (a is None) == (b is None)
        if a is not None:
            assert set(a) == set(b) and all(abs(a[t] - b[t]) < 1e-4 for t in a)
