"""Sampler: greedy and filtered sampling against HF's logits warpers, penalties against HF's repetition
processor and a loop reimplementation, seeded rows independent of the batch, raw logprobs."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from linrec.engine.sampler import (
    Sampler,
    SamplingMetadata,
    SamplingRow,
    derive_seed,
    make_generator,
)
from linrec.engine.sampling_params import SamplingParams

V = 64
EOS = 3


def _metadata(params, outputs=None, prompts=None, generators=None, vocab_size=V, eos=EOS, device="cpu"):
    n = len(params)
    outputs = outputs or [[] for _ in range(n)]
    prompts = prompts or [[] for _ in range(n)]
    generators = generators or [None] * n
    rows = [SamplingRow(p, pr, o, g) for p, pr, o, g in zip(params, prompts, outputs, generators)]
    return SamplingMetadata.build(rows, vocab_size, eos, device)


def _logits(b, v=V, seed=0, scale=3.0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax_in_a_mixed_batch():
    logits = _logits(8)
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(8)]
    out = Sampler(torch.Generator().manual_seed(0))(logits, _metadata(params))
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (8,)
    assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None
    all_greedy = _metadata([SamplingParams(temperature=0.0)] * 8)
    assert all_greedy.all_greedy
    assert torch.equal(Sampler()(logits, all_greedy).token_ids, logits.argmax(-1))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(top_k=1, top_p=0.5, min_p=0.3)],
    ids=["top_k=1", "top_p=1e-6", "all_filters"],
)
def test_filters_that_keep_one_token_are_greedy(params):
    logits = _logits(16, seed=1)
    sampler = Sampler(torch.Generator().manual_seed(1))
    for _ in range(5):
        assert torch.equal(sampler(logits, _metadata([params] * 16)).token_ids, logits.argmax(-1))


def test_min_p_one_is_greedy_and_min_p_drops_unlikely_tokens():
    logits = _logits(16, seed=2)
    sampler = Sampler(torch.Generator().manual_seed(2))
    assert torch.equal(sampler(logits, _metadata([SamplingParams(min_p=1.0)] * 16)).token_ids, logits.argmax(-1))
    md = _metadata([SamplingParams(min_p=0.2)] * 16)
    probs = logits.softmax(-1)
    allowed = probs >= 0.2 * probs.amax(-1, keepdim=True)
    for _ in range(20):
        tokens = sampler(logits, md).token_ids
        assert allowed.gather(1, tokens.unsqueeze(1)).all()


def test_temperature_to_zero_tends_to_greedy():
    logits = _logits(16, seed=3)
    sampler = Sampler(torch.Generator().manual_seed(3))
    for temperature in (1e-2, 1e-3, 1e-4):
        md = _metadata([SamplingParams(temperature=temperature)] * 16)
        probs = sampler.compute_probs(logits, md)
        # A margin of > 0.1 between the two best logits makes the best one take all the mass.
        clear = logits.topk(2).values.diff(dim=-1).abs().squeeze(1) > 0.1
        assert clear.sum() >= 12
        top_mass = probs.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1)
        assert (top_mass[clear] > 0.999).all()
        assert torch.equal(sampler(logits, md).token_ids[clear], logits.argmax(-1)[clear])
    # Below the greedy threshold it is greedy, not a division by a tiny number.
    md = _metadata([SamplingParams(temperature=1e-7)] * 16)
    assert md.all_greedy and torch.equal(sampler(logits, md).token_ids, logits.argmax(-1))


FULL_SORT = [  # a row without top_k next to top_p: the filters sort all of [B, V]
    SamplingParams(temperature=0.7, top_k=10),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.1),
    SamplingParams(temperature=2.0),
    SamplingParams(temperature=0.9, top_k=V + 5, top_p=0.95),
]
WINDOW = [  # every sampled row has a top_k: the filters work on the top-max_top_k window
    SamplingParams(temperature=0.7, top_k=10),
    SamplingParams(temperature=1.3, top_k=30, top_p=0.8),
    SamplingParams(temperature=0.0, top_p=0.5),  # greedy: its filters are not used
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.3),
]
TOP_K_ONLY = [  # top_k without top_p next to a row that keeps every token: a partial top-k, no window
    SamplingParams(temperature=0.7, top_k=10),
    SamplingParams(temperature=1.3),
    SamplingParams(temperature=1.1, top_k=3, min_p=0.2),
]


@pytest.mark.parametrize("params", [FULL_SORT, WINDOW, TOP_K_ONLY], ids=["full_sort", "window", "top_k_only"])
def test_filtered_distribution_matches_hf_warpers(params):
    """temperature -> top_k -> top_p -> min_p, each row against transformers' own warpers."""
    logits = _logits(len(params), seed=4)
    md = _metadata(params)
    assert md.is_top_k_everywhere == (params is WINDOW)
    probs = Sampler.compute_probs(logits, md)
    max_diff = 0.0
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            continue
        scores = logits[i : i + 1].clone()
        warpers = [TemperatureLogitsWarper(p.temperature)]
        if p.top_k > 0:
            warpers.append(TopKLogitsWarper(min(p.top_k, V)))
        if p.top_p < 1.0:
            warpers.append(TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            warpers.append(MinPLogitsWarper(p.min_p))
        for warper in warpers:
            scores = warper(None, scores)
        expected = scores.softmax(-1)[0]
        assert torch.equal(probs[i] > 0, expected > 0), f"row {i}: kept sets differ"
        max_diff = max(max_diff, (probs[i] - expected).abs().max().item())
    print(f"max |probs - HF warpers| = {max_diff:.3e}")
    assert max_diff < 1e-6


def _penalized_by_loop(logits, params, prompts, outputs):
    """Penalties written out token by token (vLLM's definitions)."""
    out = logits.clone()
    for b, p in enumerate(params):
        for token in set(prompts[b]) | set(outputs[b]):
            value = out[b, token].item()
            out[b, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(outputs[b]):
            count = outputs[b].count(token)
            out[b, token] -= p.frequency_penalty * count + p.presence_penalty
    return out


def test_penalties_match_a_loop_reimplementation():
    g = torch.Generator().manual_seed(5)
    logits = _logits(5, seed=5)
    params = [
        SamplingParams(presence_penalty=0.7),
        SamplingParams(frequency_penalty=0.4),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(),  # no penalty: untouched
        SamplingParams(presence_penalty=-0.5, frequency_penalty=1.1, repetition_penalty=0.8),
    ]
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 0, 12, 4, 9)]
    outputs = [torch.randint(0, V // 4, (n,), generator=g).tolist() for n in (10, 15, 6, 5, 20)]
    md = _metadata(params, outputs, prompts)
    assert md.penalty_rows.tolist() == [0, 1, 2, 4]
    got = Sampler.apply_logits_processors(logits, md)
    expected = _penalized_by_loop(logits, params, prompts, outputs)
    diff = (got - expected).abs().max().item()
    print(f"max |penalized - loop| = {diff:.3e}")
    assert diff < 1e-5
    assert torch.equal(got[3], logits[3])
    assert not torch.equal(got[0], logits[0])


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty):
    g = torch.Generator().manual_seed(6)
    logits = _logits(4, seed=6)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 9, 1, 13)]
    outputs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 0, 8, 6)]
    md = _metadata([SamplingParams(repetition_penalty=penalty)] * 4, outputs, prompts)
    got = Sampler.apply_logits_processors(logits, md)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    max_diff = 0.0
    for b in range(4):
        input_ids = torch.tensor([prompts[b] + outputs[b]])
        expected = hf(input_ids, logits[b : b + 1].clone())[0]
        max_diff = max(max_diff, (got[b] - expected).abs().max().item())
    print(f"repetition_penalty={penalty}: max |ours - HF| = {max_diff:.3e}")
    assert max_diff < 1e-6
    assert not torch.equal(got, logits)


def test_logit_bias_forces_and_bans_tokens():
    logits = _logits(4, seed=7)
    best = logits.argmax(-1)
    params = [
        SamplingParams(logit_bias={17: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={17: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={int(best[2]): -100.0}),
        SamplingParams(temperature=0.0),
    ]
    sampler = Sampler(torch.Generator().manual_seed(7))
    for _ in range(10):
        tokens = sampler(logits, _metadata(params)).token_ids
        assert tokens[0] == 17 and tokens[1] == 17
        assert tokens[2] != best[2] and tokens[2] == logits[2].topk(2).indices[1]
        assert tokens[3] == best[3]
    with pytest.raises(ValueError, match=r"logit_bias token ids in \[0, 64\)"):
        _metadata([SamplingParams(logit_bias={V: 1.0})])


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(4, V)
    logits[:, EOS] = 50.0
    logits[:, 9] = 40.0  # a stop_token_id
    logits[:, 20] = 30.0
    greedy = dict(temperature=0.0, stop_token_ids=(9,))
    params = [
        SamplingParams(min_tokens=3, **greedy),  # 2 generated: EOS and 9 masked
        SamplingParams(min_tokens=3, **greedy),  # 3 generated: nothing masked
        SamplingParams(min_tokens=3, ignore_eos=True, **greedy),  # EOS allowed, 9 masked
        SamplingParams(min_tokens=3, temperature=0.0),  # no stop_token_ids: only EOS masked
    ]
    outputs = [[1, 2], [1, 2, 5], [1], []]
    md = _metadata(params, outputs, eos=[EOS, 60])
    assert Sampler()(logits, md).token_ids.tolist() == [20, EOS, EOS, 9]
    masked = Sampler.apply_logits_processors(logits, md)
    assert masked[0, 60] == float("-inf") and masked[2, 60] == 0.0


def test_seeded_row_is_independent_of_the_batch():
    """The same seeded request alone, and at rows 0, 17 and 32 of a batch of 33, for 6 steps."""
    target = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    steps = [_logits(1, seed=100 + s)[0] for s in range(6)]

    def run(position, batch_size):
        g = torch.Generator().manual_seed(99)
        others = [
            SamplingParams(temperature=0.0),
            SamplingParams(temperature=1.1, seed=7),
            SamplingParams(temperature=0.8, top_p=0.5),
            SamplingParams(temperature=1.0, min_p=0.2, seed=8),
        ]
        params = [others[i % len(others)] for i in range(batch_size)]
        params[position] = target
        generators = [make_generator(p.seed) if p.seed is not None else None for p in params]
        sampler = Sampler(torch.Generator().manual_seed(position))
        tokens = []
        for logits_row in steps:
            logits = torch.randn(batch_size, V, generator=g) * 3
            logits[position] = logits_row
            tokens.append(sampler(logits, _metadata(params, generators=generators)).token_ids[position].item())
        return tokens

    alone = run(0, 1)
    for position in (0, 17, 32):
        assert run(position, 33) == alone, f"row {position} of 33 differs from the request alone"
    assert run(0, 1) == alone  # reproducible from the seed


def test_seeded_rows_advance_only_their_own_generator():
    greedy_gen, sampled_gen = make_generator(3), make_generator(4)
    greedy_state, sampled_state = greedy_gen.get_state(), sampled_gen.get_state()
    params = [SamplingParams(temperature=0.0, seed=3), SamplingParams(seed=4), SamplingParams()]
    Sampler()(_logits(3), _metadata(params, generators=[greedy_gen, sampled_gen, None]))
    assert torch.equal(greedy_gen.get_state(), greedy_state)  # a greedy row draws nothing
    assert not torch.equal(sampled_gen.get_state(), sampled_state)


def test_seeded_draws_follow_the_distribution():
    """Chi-square of 4000 seeded draws against the filtered probabilities (df <= 15, loose bound)."""
    logits = _logits(1, v=16, seed=9, scale=1.0)
    md = _metadata([SamplingParams(temperature=1.0, top_k=12, seed=5)], generators=[make_generator(5)], vocab_size=16)
    sampler = Sampler()
    probs = sampler.compute_probs(logits, md)[0]
    num_draws = 4000
    counts = torch.zeros(16)
    for _ in range(num_draws):
        counts[sampler.draw(sampler.compute_probs(logits, md), md)[0]] += 1
    assert counts[probs == 0].sum() == 0, "drew a token that top_k removed"
    expected = probs[probs > 0] * num_draws
    chi2 = (((counts[probs > 0] - expected) ** 2) / expected).sum().item()
    print(f"chi2 = {chi2:.1f} over {int((probs > 0).sum()) - 1} degrees of freedom")
    assert chi2 < 45.0  # df=11: p ~ 1e-5 at 45


def test_unseeded_batch_draws_follow_the_distribution():
    logits = _logits(1, v=8, seed=10, scale=1.0).expand(20000, 8)
    md = _metadata([SamplingParams(temperature=1.0)] * 20000, vocab_size=8)
    tokens = Sampler(torch.Generator().manual_seed(0))(logits, md).token_ids
    probs = logits[0].softmax(-1)
    counts = torch.bincount(tokens, minlength=8).float()
    chi2 = (((counts - probs * 20000) ** 2) / (probs * 20000)).sum().item()
    print(f"chi2 = {chi2:.1f} over 7 degrees of freedom")
    assert chi2 < 40.0


def test_logprobs_are_raw_log_softmax_with_sorted_top_k():
    logits = _logits(4, seed=11)
    params = [
        SamplingParams(logprobs=5, logit_bias={0: 100.0}),  # the bias picks token 0; logprobs stay raw
        SamplingParams(logprobs=0, temperature=0.0, repetition_penalty=2.0),
        SamplingParams(),
        SamplingParams(logprobs=2, top_k=3),
    ]
    md = _metadata(params, outputs=[[1], [2, 2], [], []], prompts=[[5], [6], [], []])
    assert md.max_num_logprobs == 5
    out = Sampler(torch.Generator().manual_seed(11))(logits, md)
    raw = torch.log_softmax(logits, -1)
    assert out.token_ids[0] == 0
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1), atol=0, rtol=0)
    assert out.top_token_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    assert torch.equal(out.top_token_ids, logits.topk(5).indices)
    assert torch.equal(out.top_logprobs, raw.gather(1, out.top_token_ids))
    assert (out.top_logprobs.diff(dim=-1) <= 0).all()
    only_zero = _metadata([SamplingParams(logprobs=0)])
    out = Sampler()(logits[:1], only_zero)
    assert out.top_token_ids.shape == (1, 0) and out.logprobs.shape == (1,)


def test_derived_seeds_and_generators():
    assert derive_seed(42) == 42 and derive_seed(42, 0) == 42
    children = [derive_seed(42, i) for i in range(8)]
    assert len(set(children)) == 8 and derive_seed(42, 3) == children[3]
    assert derive_seed(43, 0) not in children
    assert 0 <= derive_seed(-1) < 2**64
    a = torch.rand(5, generator=make_generator(42, child_index=2))
    b = torch.rand(5, generator=make_generator(42, child_index=2))
    c = torch.rand(5, generator=make_generator(42, child_index=1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="child_index >= 0"):
        derive_seed(1, -1)


def test_build_and_call_reject_bad_inputs():
    with pytest.raises(ValueError, match=r"output_token_ids in \[0, 64\), got values in \[0, 64\]"):
        _metadata([SamplingParams(frequency_penalty=1.0)], outputs=[[0, V]])
    with pytest.raises(ValueError, match="eos_token_ids"):
        _metadata([SamplingParams()], eos=V + 1)
    with pytest.raises(ValueError, match="expected logits"):
        Sampler()(torch.zeros(2, V), _metadata([SamplingParams()]))
    with pytest.raises(ValueError, match="expected logprobs <= vocab size 8, got 10"):
        SamplingMetadata.build([(SamplingParams(logprobs=10), [], [], None)], 8, ())
    with pytest.raises(ValueError, match="empty batch"):
        SamplingMetadata.build([], V, EOS)


def test_build_skips_unused_features():
    md = _metadata([SamplingParams(), SamplingParams(temperature=0.0, top_k=5)])
    assert md.top_k is None and md.top_p is None and md.min_p is None  # greedy rows carry no filters
    assert md.penalty_rows is None and md.logit_bias_rows is None and md.min_tokens_rows is None
    assert md.max_num_logprobs is None and not md.all_greedy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_row_is_independent_of_the_batch_on_cuda():
    target = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=77)
    vocab_size = 32000
    row = torch.randn(vocab_size, device="cuda") * 3
    results = []
    for batch_size, position in ((1, 0), (64, 0), (64, 40), (200, 199)):
        params = [SamplingParams(temperature=1.0, top_p=0.7)] * batch_size
        params[position] = target
        generators = [None] * batch_size
        generators[position] = make_generator(77, "cuda")
        logits = torch.randn(batch_size, vocab_size, device="cuda") * 3
        logits[position] = row
        md = _metadata(params, generators=generators, vocab_size=vocab_size, device="cuda")
        sampler = Sampler()
        results.append([sampler(logits, md).token_ids[position].item() for _ in range(8)])
    assert all(r == results[0] for r in results), results
