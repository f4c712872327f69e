"""model.py against slow, obvious references: full forward passes, one row at a time, no padding."""
import math

import pytest
import torch

from data import EOS, PAD
from model import (GPT, Decoder, GPTConfig, KVCache, N_REAL_TOKENS, ScalarHead, last_real_index,
                   response_logprobs, sample_token, sampling_cdf)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(block_size=64, n_layer=2, n_head=2, n_embd=32), **kw})).eval()


def left_pad(rows, pad=50257):
    P = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (P - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_left_padding_does_not_change_real_token_logits():
    m = tiny()
    row = torch.randint(0, 50257, (1, 9)).tolist()[0]
    ref = m(torch.tensor([row]))[0][0]  # no padding, causal fast path
    for n_pad in (0, 1, 7):
        ids, mask = left_pad([row, row + [5] * n_pad])  # second row forces n_pad pads on the first
        out = m(ids, mask=mask)[0][0, -len(row):]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward():
    m = tiny(1)
    rows = [torch.randint(0, 50257, (n,)).tolist() for n in (3, 8, 5)]
    cont = torch.randint(0, 50257, (3, 6))
    ids, mask = left_pad(rows)
    P = ids.size(1)
    cache = KVCache(m.config, 3, P + 6, "cpu", torch.float32)
    h = [m.hidden(ids, mask, cache, torch.arange(P))[:, -1]]
    for t in range(5):
        h.append(m.hidden(cont[:, t:t + 1], None, cache, torch.tensor([P + t]))[:, -1])
    cached = m.logits(torch.stack(h, 1))  # (B, 6, V)
    for b, row in enumerate(rows):  # reference: one unpadded row at a time, full recomputation
        full = m(torch.tensor([row + cont[b, :5].tolist()]))[0][0, len(row) - 1:]
        torch.testing.assert_close(cached[b], full, rtol=1e-4, atol=1e-4)


def test_greedy_generate_equals_stepwise_argmax_of_full_forwards():
    m = tiny(2)
    rows = [[464, 3290, 373], [40, 1842, 428, 3807, 780]]
    ids, mask = left_pad(rows)
    out, rmask = m.generate(ids, mask, max_new_tokens=8, temperature=0)
    for b, row in enumerate(rows):
        seq = list(row)
        for _ in range(8):
            seq.append(int(m(torch.tensor([seq]))[0][0, -1].argmax()))
        assert out[b].tolist() == seq[len(row):]
    assert rmask.sum() == 16  # no EOS in 8 greedy steps of an untrained model: all tokens real


def test_generate_stops_rows_at_eos_and_pads_after():
    m = tiny(3)
    bias = torch.zeros(N_REAL_TOKENS)
    bias[50256] = 9.0  # EOS about 1 in 7 per step, so that rows finish at different steps
    m.logits = lambda h: GPT.logits(m, h) + bias
    ids, mask = left_pad([[1, 2, 3], [4, 5]] * 8)
    out, rmask = m.generate(ids, mask, 12, generator=torch.Generator().manual_seed(0))
    ends = set()
    for row, rm in zip(out.tolist(), rmask.tolist()):
        n = row.index(50256) + 1 if 50256 in row else len(row)
        ends.add(n)
        assert rm == [1] * n + [0] * (len(row) - n)  # real up to and including the first EOS
        assert row[n:] == [50257] * (len(row) - n)  # finished rows emit padding
    assert len(ends) > 2


def test_generate_is_reproducible_and_never_samples_padding_ids():
    m = tiny(4)
    ids, mask = left_pad([[1, 2, 3], [4, 5], [9]])
    a = m.generate(ids, mask, 20, generator=torch.Generator().manual_seed(7))[0]
    b = m.generate(ids, mask, 20, generator=torch.Generator().manual_seed(7))[0]
    c = m.generate(ids, mask, 20, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a < N_REAL_TOKENS).all()


def test_sample_token_matches_the_categorical_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample_token(logits, generator=g), minlength=4).float() / 20000
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)
    # top_k=2 keeps the two largest; top_p=0.6 keeps the smallest head reaching 0.6 (here tokens 2 and 1)
    assert set(sample_token(logits, top_k=2, generator=g).unique().tolist()) == {1, 2}
    p = logits[0].softmax(-1)  # [0.087, 0.237, 0.644, 0.032]
    assert set(sample_token(logits, top_p=0.6, generator=g).unique().tolist()) == {2}
    assert set(sample_token(logits, top_p=0.8, generator=g).unique().tolist()) == {1, 2}
    assert p[2] > 0.6


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0 ** -53])  # the smallest and the largest value torch.rand can return
def test_sample_token_never_draws_a_token_of_probability_zero(monkeypatch, u):
    # tokens 0, 1 and 4, 5 are cut (-inf): a draw at either end of the uniform's range must land on 2 or 3
    logits = torch.tensor([[-math.inf, -math.inf, 0.3, 1e-3, -math.inf, -math.inf]] * 3)
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, u, dtype=kw.get("dtype")))
    assert set(sample_token(logits).tolist()) <= {2, 3}
    assert set(sample_token(torch.tensor([[0.0, 5.0, -math.inf]]), top_k=1).tolist()) == {1}


def skewed_logits():
    """GPT-2-sized logits (1, 50257): one token of probability ~0.9995 first, then 50,256 tokens of ~1e-8 each.
    In float32 the CDF steps of the small ones vanish next to 1 (its resolution there is 6e-8)."""
    logits = torch.rand(1, N_REAL_TOKENS, generator=torch.Generator().manual_seed(0)) * 0.5  # small ones differ
    logits[0, 0] = math.log(1e8)
    return logits


def test_sample_token_draws_each_token_of_a_skewed_softmax_exactly(monkeypatch):
    # u put at the middle of a token's exact CDF interval (float64 reference, steps of ~1e-8) must draw that token;
    # with a float32 CDF and uniform, most of these land on another token
    logits = skewed_logits()
    p = logits.double().softmax(-1)[0]
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0) / p.sum()])
    want = torch.cat([torch.tensor([0, 1, N_REAL_TOKENS - 1]),
                      torch.randint(1, N_REAL_TOKENS, (61,), generator=torch.Generator().manual_seed(1))])
    u = ((cdf[want] + cdf[want + 1]) / 2)[:, None]  # (64, 1)
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: u.to(kw.get("dtype")))
    assert sample_token(logits.repeat(len(want), 1)).tolist() == want.tolist()


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.0, 40000)])
def test_sampling_cdf_gives_every_token_its_softmax_probability(temperature, top_k):
    # each token's chance under the sampler is its CDF step over the total: equal to its softmax probability up to
    # float64 rounding of the running sum (half a unit in the last place, ~1e-16), and no token of probability
    # above that is out of reach (in float32 ~20k of these tokens could never be drawn)
    logits = skewed_logits()
    cdf = sampling_cdf(logits, temperature, top_k)[0]
    chance = torch.diff(cdf, prepend=cdf.new_zeros(1)) / cdf[-1]
    x = logits.double()[0] / temperature
    if top_k:
        x = x.masked_fill(x < x.topk(top_k).values[-1], -math.inf)
    p = x.softmax(-1)
    assert cdf.dtype == torch.float64
    assert ((chance - p).abs() <= 1e-12 * p + 2.0 ** -52).all()
    assert (chance[p > 1e-14] > 0).all() and (chance[p == 0] == 0).all()
    assert 0.5 * (chance - p).abs().sum() < 1e-11  # total variation


def test_top_p_outside_zero_one_is_refused():
    logits = torch.zeros(2, 5)
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="top_p"):
            sample_token(logits, top_p=bad)
    m = tiny(6)
    ids, mask = left_pad([[1, 2, 3]])
    with pytest.raises(ValueError, match="top_p"):
        m.generate(ids, mask, 4, top_p=0.0)
    assert sample_token(logits, top_p=1.0).shape == (2,)


def test_response_logprobs_equals_plain_log_softmax_gather():
    m = tiny(5)
    ids, mask = left_pad([[1, 2, 3], [4, 5]])
    resp = torch.tensor([[7, 8, 50256], [9, 50256, 50257]])
    rmask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    full, fmask = torch.cat([ids, resp], 1), torch.cat([mask, rmask], 1)
    logp, ent = response_logprobs(m, full, fmask, 3, temperature=0.7, with_entropy=True)
    for b in range(2):
        real = full[b][fmask[b].bool()].tolist()
        lg = m(torch.tensor([real]))[0][0] / 0.7
        n = int(rmask[b].sum())
        ref = torch.log_softmax(lg[-n - 1:-1], -1).gather(-1, torch.tensor(real[-n:])[:, None])[:, 0]
        torch.testing.assert_close(logp[b, :n], ref, rtol=1e-4, atol=1e-4)
        assert (logp[b, n:] == 0).all() and (ent[b, n:] == 0).all()
        ref_ent = -(lg[-n - 1:-1].softmax(-1) * lg[-n - 1:-1].log_softmax(-1)).sum(-1)
        torch.testing.assert_close(ent[b, :n], ref_ent, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,keep", [(1, True), (3, True), (1024, True), (3, False), (1024, False)])
def test_token_logprobs_in_slices_match_the_full_softmax_and_its_gradients(monkeypatch, rows, keep):
    """TokenLogProbs (slices of rows; the softmax kept from forward, or made again in backward) against one plain
    log_softmax over all rows: the values, and the gradients with respect to the hidden states and the (tied)
    unembedding, whose padding rows (ids 50,257 up, no token) get none."""
    import model
    monkeypatch.setattr(model.TokenLogProbs, "ROWS", {"cpu": rows})
    monkeypatch.setattr(model.TokenLogProbs, "KEEP", model.TokenLogProbs.KEEP if keep else 0)
    torch.manual_seed(0)
    m = tiny(6).double()
    ids = torch.randint(0, 50257, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    g = torch.randn(3, 4, dtype=torch.float64)
    logp, ent = response_logprobs(m, ids, mask, 4, temperature=0.8, with_entropy=True)
    (logp * g).sum().backward()
    fast = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits = m(ids)[0][:, -5:-1].double() / 0.8  # plain: the full (B, R, V) softmax
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, -4:, None]).squeeze(-1) * mask[:, -4:]
    (ref * g).sum().backward()
    torch.testing.assert_close(logp.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    ref_ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1) * mask[:, -4:]
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(fast, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert fast[0].shape[0] == 50304 and fast[0][50257:].abs().max() < 1e-12 < fast[0][:50257].abs().max()


def test_a_compiled_models_logprobs_match_the_sliced_ones_and_their_gradients(monkeypatch):
    """With --compile (GPT.compile_hidden) log-probs take plain_token_logprobs through the compiler: the values,
    entropies and every weight's gradient of TokenLogProbs (slices; the softmax made again in backward), with
    padding, a temperature, in calls of a few rows, and without the entropy. On the CPU through aot_eager (as the
    decoding test above), on a GPU through inductor."""
    import model
    cuda = torch.cuda.is_available()
    if not cuda:
        compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(model.TokenLogProbs, "KEEP", 0)
    monkeypatch.setattr(model, "COMPILED_ROWS", 5)  # 12 rows: calls of 5, 5 and 2
    calls, apply = [], model.TokenLogProbs.apply
    monkeypatch.setattr(model.TokenLogProbs, "apply", lambda *a: calls.append(1) or apply(*a))
    dev = "cuda" if cuda else "cpu"
    plain, compiled = tiny(6).double().to(dev), tiny(6).double().to(dev).compile_hidden()  # float64: no rounding
    ids = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev)
    out = []
    for m in (plain, compiled):
        logp, ent = response_logprobs(m, ids, mask, 4, temperature=0.8, with_entropy=True)
        (logp * g).sum().backward()
        out.append((logp.detach(), ent, [p.grad for p in m.parameters()], response_logprobs(m, ids, mask, 4)))
    (a, a_ent, a_grads, a_plain), (b, b_ent, b_grads, b_plain) = out
    assert len(calls) == 2  # the plain model's; the compiled one took the compiled path
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b_ent, a_ent, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b_plain, a_plain, rtol=1e-9, atol=1e-9)
    assert (b[1, -2:] == 0).all() and (b_ent[1, -2:] == 0).all() and (b[0] < 0).all()
    for x, y in zip(a_grads, b_grads):
        torch.testing.assert_close(y, x, rtol=1e-7, atol=1e-12)
    assert b_grads[0][50257:].abs().max() == 0 < b_grads[0][:50257].abs().max()


@torch.no_grad()
def test_generate_reuses_its_buffers_without_leaking_state_between_calls():
    """A second call with other prompts (shorter, then longer) gives what a fresh model gives: nothing of the first
    call's cache, done flags or output survives into the next."""
    m, fresh = tiny(7), tiny(7)
    a_ids, a_mask = left_pad([[1, 2, 3, 4, 5, 6], [7, 8]])
    b_ids, b_mask = left_pad([[9, 10], [11]])
    m.generate(a_ids, a_mask, 10, generator=torch.Generator().manual_seed(1))
    for ids, mask in ((b_ids, b_mask), (a_ids, a_mask)):
        got = m.generate(ids, mask, 10, generator=torch.Generator().manual_seed(2))
        want = fresh.generate(ids, mask, 10, generator=torch.Generator().manual_seed(2))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


GRAPH_SAMPLINGS = [dict(), dict(temperature=0.7, top_k=50), dict(top_p=0.9)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph sampler needs a CUDA GPU")
@pytest.mark.parametrize("sampling", GRAPH_SAMPLINGS)
def test_graph_sampler_draws_the_eager_samplers_tokens_on_a_gpu(sampling):
    """In float32, with the same seed, the captured decoding step draws exactly the eager step's tokens, call after
    call (a graph replaying stale random numbers, a wrong cache slot or a stale done flag would part from it).
    Prompt + new tokens of 40 (the graph's cache is 64 long, the eager one's 40: masked slots must not count) and 64
    (both 64), with left padding."""
    m = tiny(5, block_size=128).cuda()
    for P, new in ((10, 30), (16, 48)):
        ids = torch.randint(0, 50257, (32, P), generator=torch.Generator().manual_seed(P)).cuda()
        mask = torch.ones_like(ids)
        mask[::3, :P // 2] = 0
        g, e = (torch.Generator(device="cuda").manual_seed(3) for _ in range(2))
        for call in range(2):  # the second call starts from the generators' advanced states
            a = m.generate(ids, mask, new, generator=g, cuda_graph=True, **sampling)
            b = m.generate(ids, mask, new, generator=e, cuda_graph=False, **sampling)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (P, new, call)
        other = m.generate(ids, mask, new, generator=torch.Generator(device="cuda").manual_seed(4), **sampling)
        assert not torch.equal(a[0], other[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph sampler needs a CUDA GPU")
@pytest.mark.parametrize("sampling", GRAPH_SAMPLINGS)
def test_the_compiled_graph_sampler_draws_the_plain_graphs_tokens_on_a_gpu(sampling):
    """With --compile (inductor) the captured step, its model part compiled, draws the plain graph's tokens in
    float32 from the same seed (fused kernels round differently only far below what parts two tokens)."""
    plain, compiled = tiny(5, block_size=128).cuda(), tiny(5, block_size=128).cuda().compile_hidden()
    ids = torch.randint(0, 50257, (32, 16), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[::3, :8] = 0
    a, b = (m.generate(ids, mask, 48, generator=torch.Generator(device="cuda").manual_seed(3), **sampling)
            for m in (plain, compiled))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_graphs_step_reads_bfloat16_copies_of_the_linear_weights_and_draws_the_same_tokens():
    """What a graph captures under autocast (GPT.graph_step), run eagerly on the CPU: it reads bfloat16 copies of
    every Linear's weight and bias (the embedding and LayerNorms stay float32) and draws the tokens of the plain
    step, which casts them itself."""
    m = tiny(3)
    ids = torch.randint(0, 50257, (6, 8), generator=torch.Generator().manual_seed(0))
    copies = m._graph_weights(torch.bfloat16)
    linear = {f"{n}.{p}" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) for p, _ in
              mod.named_parameters()}
    assert set(copies) == linear and all(c.dtype == torch.bfloat16 for c in copies.values())
    assert m.transformer.wte.weight.dtype == torch.float32 and not m._graph_weights(torch.float32)
    outs = []
    for graph_step in (False, True):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            d = Decoder(m.config, 6, 24, 16, torch.device("cpu"), torch.bfloat16, graph=False)
            d.gen = torch.Generator().manual_seed(1)
            d.cache.valid.zero_()
            h = m.hidden(ids, torch.ones_like(ids), d.cache, torch.arange(8))[:, -1]
            d.start(sample_token(m.logits(h).float(), generator=d.gen), 8, EOS, PAD)
            step = m.graph_step(d, (1.0, 0, 1.0, EOS, PAD), torch.bfloat16) if graph_step else \
                (lambda: m.decode_step(d, 1.0, 0, 1.0, EOS, PAD, d.gen))
            for _ in range(15):
                step()
        outs.append(d.out)
    assert torch.equal(outs[0], outs[1]) and len(set(outs[0][0].tolist())) > 8


def test_the_compiled_decoding_step_draws_the_plain_steps_tokens(monkeypatch):
    """With --compile (GPT.compile_hidden) a decoding step's model part is compiled (next_logits): it draws the
    tokens of the plain step, writing its keys into the cache tensors it was given (what a CUDA graph replays).
    On the CPU the graph dynamo traces runs through AOT autograd without inductor's code generation (aot_eager:
    the trace and the in-place cache writes are what is tested; compiling C++ would take 30 s); on a GPU, inductor."""
    if not torch.cuda.is_available():
        compile = torch.compile
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, backend="aot_eager", **kw))
    m = tiny(5)
    ids = torch.randint(0, 50257, (4, 8), generator=torch.Generator().manual_seed(0))
    outs = []
    for compiled in (False, True):
        if compiled:
            m.compile_hidden()
        with torch.no_grad():
            d = Decoder(m.config, 4, 24, 16, torch.device("cpu"), torch.float32, graph=False)
            d.gen, k = torch.Generator().manual_seed(1), list(d.cache.k)
            d.cache.valid.zero_()
            h = m.hidden(ids, torch.ones_like(ids), d.cache, torch.arange(8))[:, -1]
            d.start(sample_token(m.logits(h).float(), generator=d.gen), 8, EOS, PAD)
            for _ in range(15):
                m.decode_step(d, 1.0, 0, 1.0, EOS, PAD, d.gen)
        assert all(a is b for a, b in zip(k, d.cache.k)) and d.cache.k[0][:, :, 22].abs().sum() > 0
        outs.append(d.out)
    assert torch.equal(outs[0], outs[1]) and len(set(outs[0][0].tolist())) > 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph sampler needs a CUDA GPU")
def test_graph_sampler_under_autocast_follows_the_weights_as_they_change_on_a_gpu():
    """Under bf16 autocast with float32 weights (a policy in training) the graph reads bfloat16 copies of the Linear
    weights (GPT._graph_weights), refreshed at each generate(): after the weights change it draws what a fresh
    model with the changed weights draws, and what the eager sampler draws (prompt + new = 64: the same shapes, so
    the same kernels), not the tokens from before the change."""
    m = tiny(5, block_size=128).cuda()
    ids = torch.randint(0, 50257, (32, 16), generator=torch.Generator().manual_seed(0)).cuda()

    def sample(model, graph=True):
        with torch.autocast("cuda", torch.bfloat16):
            return model.generate(ids, torch.ones_like(ids), 48, cuda_graph=graph,
                                  generator=torch.Generator(device="cuda").manual_seed(3))[0]
    before = sample(m)
    assert torch.equal(before, sample(m, graph=False))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after, fresh = sample(m), tiny(6, block_size=128).cuda()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(after, sample(fresh)) and torch.equal(after, sample(m, graph=False))
    assert not torch.equal(after, before)


def test_last_real_index_and_scalar_head_init():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_real_index(mask).tolist() == [1, 3, 3]
    torch.manual_seed(0)
    head = ScalarHead(1023)
    assert abs(head.proj.weight.std().item() - 1 / math.sqrt(1024)) < 0.005
    assert head.proj.bias.item() == 0


def test_parameter_names_map_onto_gpt2():
    names = {n for n, _ in tiny().named_parameters()}
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.ln_2.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight"]:
        assert n in names, n
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight


def test_right_padded_batches_take_the_causal_path_with_the_same_real_outputs():
    """Rows of real tokens then padding (no left padding) skip the attention mask; every real token's hidden state
    is the masked path's. A left-padded batch keeps the mask."""
    m = tiny(8)
    ids = torch.randint(0, 50257, (3, 10))
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4, [1] * 3 + [0] * 7])
    fast, masked = m.hidden(ids, mask), m._hidden(ids, mask, None, None)
    torch.testing.assert_close(fast[mask.bool()], masked[mask.bool()], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast[~mask.bool()], masked[~mask.bool()])  # the padding did take the other path
    left = mask.flip(1)
    torch.testing.assert_close(m.hidden(ids, left), m._hidden(ids, left, None, None))
