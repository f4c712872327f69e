"""
The tiny GPT that every stage trains: GPT-2's architecture, padding-aware, with a preallocated KV cache for
batched sampling, the one sampling helper of every stage (sample_responses: prompt strings in, responses out), the
one helper that turns logits into per-token log-probs, and a scalar head for reward models and critics.

Layout used everywhere in this project: a batch of prompt + response sequences is stored as
    [ left-padded prompt | right-padded response ]        ids (B, P + R), mask (B, P + R), 1 = real token
so every response starts at column P, and the logits that predict it are those of columns P-1 .. P+R-2.

Simplifications on purpose:
- Padding is handled with an explicit boolean attention mask (SDPA's memory-efficient kernel); only a batch with
  no padding at all takes the flash path (is_causal=True). A packed/varlen kernel would be the next step.
- Decoding attends over the whole preallocated cache every step (a mask hides empty slots). That keeps every
  shape static, so one step can be captured as a CUDA graph, at the price of O(block_size) work per token.
- Ids >= 50257 (GPT-2 has 50257 real tokens; the table is padded to 50304, and PAD = 50257) are removed from
  every softmax: they can never be sampled and never take probability mass in a log-prob.
"""
import itertools
import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from config import ConfigError
from data import EOS, PAD, decode, encode_prompt

N_REAL_TOKENS = 50257  # GPT-2's vocabulary; ids above are padding of the embedding table (and our PAD)
DECODERS = 4  # decoding shapes (each a CUDA graph and a KV cache) a model keeps on a GPU
COMPILED_ROWS = 8192  # rows per call of a compiled model's log-probs (their bf16 logits: 824 MB, kept for backward)


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (prompt + response) the model sees
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x, attn_mask, kv=None, idx=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if kv is not None:  # write the new keys/values into their cache slots, then attend over the whole cache
            k_buf, v_buf = kv
            k_buf.index_copy_(2, idx, k.to(k_buf.dtype))
            v_buf.index_copy_(2, idx, v.to(v_buf.dtype))
            k, v = k_buf.to(q.dtype), v_buf.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask, kv=None, idx=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv, idx)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Preallocated keys and values for every layer, plus which slots hold real tokens: k, v a (B, H, T, hd) tensor
    per layer, valid (B, T) bool. Nothing is ever reallocated, so the decoding step has static shapes and addresses
    (what CUDA graph capture needs). One tensor per layer, not views of one: a compiled step writes a view of its
    input by copying the whole tensor, and the new slot alone in place otherwise."""

    def __init__(self, cfg, batch_size, length, device, dtype):
        shape = (batch_size, cfg.n_head, length, cfg.n_embd // cfg.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch_size, length, dtype=torch.bool, device=device)


def attention_mask(valid, q_idx):
    """(B, 1, Tq, Tk) bool: query at absolute slot q_idx[i] sees real keys at slots <= its own, and itself: a padding
    query (left padding has no real key before it) gets a well-defined softmax, not NaN; its output is never used."""
    k_idx = torch.arange(valid.size(1), device=valid.device)
    causal = k_idx[None, :] <= q_idx[:, None]  # (Tq, Tk)
    self_ = k_idx[None, :] == q_idx[:, None]
    return (causal[None] & (valid[:, None, :] | self_[None]))[:, None]


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def compile_hidden(self):
        """torch.compile every training step's and log-prob's path (hidden() without a cache, token_logprobs) and a
        decoding step's model part (next_logits), which the CUDA graph replays. Weights and checkpoints unaffected."""
        self.compiled = torch.compile(self._hidden)
        self.compiled_decode = torch.compile(self.next_logits, dynamic=False)
        self.compiled_logprobs = torch.compile(plain_token_logprobs)
        return self

    def hidden(self, idx, mask=None, cache=None, cache_idx=None):
        """Final hidden states (B, T, C) of tokens idx (B, T).

        mask (B, T): 1 on real tokens (None: all real, the fast causal path). Position ids count real tokens only
        (cumsum(mask) - 1), so left padding changes nothing for real tokens. With a cache, the T tokens go into
        slots cache_idx (T,) and attend to everything already there.

        A mask of real tokens followed by padding in every row (right padding only) needs no attention mask: under
        causal attention a real token never sees the padding after it, and its position is its column. Such batches
        take the fast causal path (flash attention); their padding positions' outputs are not used anywhere."""
        if cache is None and mask is not None and bool((mask[:, 0] > 0).all() & (mask[:, 1:] <= mask[:, :-1]).all()):
            mask = None
        compiled = self.__dict__.get("compiled") if cache is None else None
        return (compiled or self._hidden)(idx, mask, cache, cache_idx)

    def _hidden(self, idx, mask, cache, cache_idx):
        B, T = idx.shape
        if cache is None:
            if mask is None:
                pos, attn_mask, kv = torch.arange(T, device=idx.device)[None], None, [None] * len(self.transformer.h)
            else:
                valid, q_idx = mask.bool(), torch.arange(T, device=idx.device)
                pos = (valid.long().cumsum(1) - 1).clamp(min=0)
                attn_mask, kv = attention_mask(valid, q_idx), [None] * len(self.transformer.h)
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=idx.device) if mask is None else mask.bool()
            cache.valid.index_copy_(1, cache_idx, real)
            pos = (cache.valid.long().cumsum(1) - 1).clamp(min=0).index_select(1, cache_idx)
            attn_mask, q_idx = attention_mask(cache.valid, cache_idx), cache_idx
            kv = list(zip(cache.k, cache.v))
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block, layer_kv in zip(self.transformer.h, kv):
            if getattr(self, "grad_checkpoint", False) and cache is None and torch.is_grad_enabled():
                # --grad_checkpoint: keep only each block's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, layer_kv, cache_idx)
        return self.transformer.ln_f(x)

    def logits(self, h):
        """(..., C) -> (..., 50257): a view of the product with the whole padded table (aligned: RESULTS.md)."""
        return F.linear(h, self.lm_head.weight)[..., :N_REAL_TOKENS]

    def forward(self, idx, targets=None, mask=None):
        """nanoGPT's interface: logits (B, T, 50257) and, given targets (B, T), the mean cross-entropy over
        targets that are not -1."""
        logits = self.logits(self._hidden(idx, mask, None, None))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompt, prompt_mask, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                 eos_id=EOS, pad_id=PAD, generator=None, cuda_graph=True):
        """Sample continuations of left-padded prompts (B, P) with mask (B, P). Returns (tokens, mask), both
        (B, max_new_tokens): the sampled ids, and 1 on every sampled token up to and including the first EOS. After
        its EOS a row emits pad_id (its mask is 0). temperature 0 is greedy. Sampling draws from `generator` only,
        so a seeded generator gives the same samples on the same device.

        One pass over the prompts fills the KV cache (prefill), then decode_step() adds one token per row. On a GPU
        (cuda_graph=True) that step is captured once as a CUDA graph and replayed: the same kernels, on the same
        buffers, drawing the same random numbers, without the ~10 us of launch overhead of each of its few hundred
        kernels. The cache is sized to a multiple of 64 so one graph serves prompts of similar lengths."""
        check_top_p(top_p)
        B, P = prompt.shape
        assert P + max_new_tokens <= self.config.block_size, "prompt + max_new_tokens exceeds block_size"
        graph = cuda_graph and prompt.device.type == "cuda" and max_new_tokens > 1
        length = -(-(P + max_new_tokens) // 64) * 64 if graph else P + max_new_tokens
        d = self._decoder(B, length, max_new_tokens, prompt.device, (temperature, top_k, top_p, eos_id, pad_id), graph)
        gen = d.lend(generator) if graph else generator  # the graph draws from its own generator, in our state
        for name, copy in self._graph_weights(d.cache.k[0].dtype).items() if graph else ():
            copy.copy_(self.get_parameter(name))  # the copies the graph reads (in its dtype), as the weights are now
        d.cache.valid.zero_()
        h = self.hidden(prompt, prompt_mask, d.cache, torch.arange(P, device=prompt.device))[:, -1]  # prefill
        first = sample_token(self.logits(h).float(), temperature, top_k, top_p, gen)  # (B,)
        d.start(first, P, eos_id, pad_id)
        for t in range(1, max_new_tokens):
            if graph:
                d.graph.replay()
            else:
                self.decode_step(d, temperature, top_k, top_p, eos_id, pad_id, gen)
            if t % 16 == 15 and bool(d.done.all()):  # one host sync per 16 tokens
                break
        if graph:
            d.give_back(generator)
        out = d.out.clone()
        return out, response_mask(out, eos_id, pad_id)

    def decode_step(self, d, temperature, top_k, top_p, eos_id, pad_id, generator):
        """One new token per row: feeds d.tok at cache slot d.slot, writes the next token into column d.col of d.out.
        Tensor ops on d's fixed buffers only (no host sync, no Python branch on data), so it can be a CUDA graph."""
        logits = (self.__dict__.get("compiled_decode") or self.next_logits)(d.tok, d.slot, d.cache)
        tok = sample_token(logits, temperature, top_k, top_p, generator)
        tok = torch.where(d.done, pad_id, tok)
        d.out.index_copy_(1, d.col, tok[:, None])
        d.done |= tok == eos_id
        d.tok.copy_(tok)
        d.slot += 1
        d.col += 1

    def next_logits(self, tok, slot, cache):
        """Logits (B, 50257), float32, after tokens tok (B,) go into cache slot `slot` (1,): a decoding step's model
        part, compiled with --compile (the sampling cannot be: dynamo does not trace a torch.Generator)."""
        return self.logits(self.hidden(tok[:, None], None, cache, slot)[:, -1]).float()

    def _decoder(self, B, length, max_new_tokens, device, sampling, graph):
        """The decoding buffers (and, on a GPU, the captured step) for this shape, made once and kept: the last
        DECODERS shapes on a GPU (a training run uses one or two: its rollout and evaluation batches), the last one
        eagerly (its buffers are cheap to remake)."""
        dtype = matmul_dtype(self, device.type)
        key = (B, length, max_new_tokens, str(device), dtype, sampling, graph)
        decoders = self.__dict__.setdefault("_decoders", {})
        if key not in decoders:
            while len(decoders) >= (DECODERS if graph else 1):
                decoders.pop(next(iter(decoders)))  # the oldest: its graph and KV cache are freed
            d = decoders[key] = Decoder(self.config, B, length, max_new_tokens, device, dtype, graph)
            if graph:
                d.capture(self.graph_step(d, sampling, dtype))
        return decoders[key]

    def graph_step(self, d, sampling, dtype):
        """The step a graph captures: decode_step on the Linear weights' copies in dtype (_graph_weights)."""
        weights = {f"model.{name}": copy for name, copy in self._graph_weights(dtype).items()}
        return lambda: torch.func.functional_call(DecodeStep(self), weights, (d, *sampling, d.gen), tie_weights=False)

    def _graph_weights(self, dtype):
        """name -> copy of every Linear's weight and bias in dtype, which the captured step reads instead: under
        autocast a graph would otherwise cast them all again at every token (its weight cache is off in a graph),
        8 more kernels a layer and the float32 weights read each time. generate() refreshes the copies from the
        model at each call, so they follow training; one set serves every shape. Empty where the weights are in
        dtype already (the tied embedding keeps its own: autocast never casts a lookup)."""
        copies = self.__dict__.setdefault("_weight_copies", {}).setdefault(dtype, {})
        for name, m in self.named_modules():
            for p_name, p in m.named_parameters(prefix=name, recurse=False) if isinstance(m, nn.Linear) else ():
                if p.dtype != dtype and p.is_floating_point() and p_name not in copies:
                    copies[p_name] = p.detach().to(dtype)
        return copies


class DecodeStep(nn.Module):
    """GPT.decode_step as a module's forward, so that torch.func.functional_call can run it on other weights."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, d, *sampling_and_generator):
        self.model.decode_step(d, *sampling_and_generator)


class Decoder:
    """Fixed buffers of one decoding shape: the KV cache, the current token per row, the cache slot and output
    column it goes to, which rows are done, and the output; plus the CUDA graph of one decode_step on them."""

    def __init__(self, cfg, B, length, max_new_tokens, device, dtype, graph):
        self.cache = KVCache(cfg, B, length, device, dtype)
        self.tok = torch.zeros(B, dtype=torch.long, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.gen = torch.Generator(device=device) if graph else None
        self.graph = None

    def start(self, first, P, eos_id, pad_id):
        """After the prefill: the first sampled token is column 0 and goes into slot P."""
        self.out.fill_(pad_id)
        self.out[:, 0] = first
        self.tok.copy_(first)
        self.done.copy_(first == eos_id)
        self.slot.fill_(P), self.col.fill_(1)

    def lend(self, generator):
        """The graph's own generator, set to the caller's state (None: the default CUDA generator's), so the draws
        are those the caller's generator would make; give_back() moves the advanced state back to the caller."""
        self.gen.set_state(generator.get_state() if generator is not None else torch.cuda.get_rng_state())
        return self.gen

    def give_back(self, generator):
        if generator is None:
            torch.cuda.set_rng_state(self.gen.get_state())
        else:
            generator.set_state(self.gen.get_state())

    def capture(self, step):
        """Record step() as a CUDA graph (after a warm-up on a side stream, as CUDA graphs need). The generator is
        registered with the graph, so each replay draws fresh numbers and advances it. Autocast's weight cache is
        off inside (a cast cached during capture would be freed after it, under the graph's feet)."""
        dev = self.tok.device.type
        amp = torch.autocast(dev, torch.get_autocast_dtype(dev), cache_enabled=False) \
            if torch.is_autocast_enabled(dev) else nullcontext()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), amp:
            for _ in range(2):
                self.slot.fill_(0), self.col.fill_(0)
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.register_generator_state(self.gen)
        self.slot.fill_(0), self.col.fill_(0)
        with torch.cuda.graph(self.graph), amp:
            step()


def check_top_p(top_p):
    """top_p must be in (0, 1]: 0 would keep no token at all, and above 1 means nothing."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sampling_cdf(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The unnormalised cumulative distribution (B, V), float64, that sample_token inverts: token i is drawn when
    u ~ U[0, cdf[:, -1]) falls in [cdf[:, i-1], cdf[:, i]), so its chance is its step over the total.

    Float64 throughout, because float32 is not enough for a 50,257-token softmax: near a cumulative sum of 1 its
    resolution is 6e-8, so a token of probability 1e-8 after a large one has a step of 0 (about 20k of GPT-2's
    tokens could never be drawn, a total variation of 3-5e-4 from the softmax per token). In float64 each token's
    chance is its softmax probability to within about 1e-16 (half a unit in the last place of the running sum), and
    at most about 1e-11 in total variation. top_k 0 and top_p 1 switch those filters off."""
    x = logits.to(torch.float64, copy=True)  # (B, V); copy: edited in place below
    if top_k and top_k < x.size(-1):
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x.masked_fill_(x < kth, float("-inf"))  # ties with the k-th largest are all kept
    x.sub_(x.amax(-1, keepdim=True))  # the largest weight is exp(0) = 1: no overflow, whatever the logits
    if temperature != 1.0:
        x.div_(temperature)
    if top_p < 1.0:  # nucleus (Holtzman et al. 2019): keep the smallest set of tokens whose probability reaches top_p
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        p = sorted_x.softmax(-1)
        drop_sorted = (p.cumsum(-1) - p) >= top_p  # the mass before this token already reaches top_p
        x.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return x.exp_().cumsum_(-1)


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row from logits (B, V), drawn from softmax(logits / temperature) after the top-k and top-p
    filters (top_k 0 and top_p 1 switch them off; temperature 0 is greedy)."""
    check_top_p(top_p)
    if temperature == 0:
        return logits.argmax(-1)
    # inverse CDF: the first token whose cumulative weight exceeds u ~ U(0, total) is a categorical draw, exact to
    # float64's precision (sampling_cdf). One uniform per row, no host sync: on a CPU, a noise value per vocabulary
    # entry (Gumbel-max, torch.multinomial) costs ten times the rest of the step. u < total: no token of probability 0.
    cdf = sampling_cdf(logits, temperature, top_k, top_p)  # (B, V) float64
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype) * total  # 2^-53 grid
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def response_mask(tokens, eos_id=EOS, pad_id=PAD):
    """1 on every token up to and including the first EOS, 0 after it (and on padding)."""
    is_eos = (tokens == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return ((~after_eos) & (tokens != pad_id)).long()


# ----------------------------------------------------------------------------------------------------------------
# the batch layout, and sampling responses to prompts in it

def layout_batch(prompts, responses, device="cpu"):
    """The project's batch layout, [left-padded prompt | right-padded response]: lists of prompt ids and of response
    ids -> (ids, mask, R), ids and mask (B, P + R) on `device`, R the longest response; every response starts at
    column P, so its log-probs are one slice. (non_blocking: a copy from ordinary memory need not wait for the GPU.)"""
    p_ids, p_mask = pad_batch(prompts, side="left")
    r_ids, r_mask = pad_batch(responses, side="right")
    ids, mask = torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask], 1)
    return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True), r_ids.size(1)


def pad_batch(seqs, side="right", pad_id=PAD):
    """Lists of ids -> (ids, mask), both LongTensor (B, T) with T the longest; mask is 1 on real tokens.

    side="right" for training, "left" for generation prompts (so every row's next token is at the end).
    The one padding routine: pad a loss mask alike with pad_batch(loss_masks, side, pad_id=0)[0]. One scatter puts
    each token at (its row, its place in its sequence + T - length on the left): a loop over rows took 2-3 ms."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
    T = int(lengths.max(initial=0))
    rows = np.repeat(np.arange(len(seqs)), lengths)
    cols = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    if side == "left":
        cols += np.repeat(T - lengths, lengths)
    ids, mask = np.full((len(seqs), T), pad_id, np.int64), np.zeros((len(seqs), T), np.int64)
    ids[rows, cols] = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, len(rows))
    mask[rows, cols] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@dataclass
class Samples:
    """Sampled responses, as text and in the project's batch layout."""
    prompts: list  # B prompt strings
    responses: list  # B response strings (decoded, without EOS)
    ids: torch.Tensor  # (B, P + R) [left-padded prompt | right-padded response], on the device
    mask: torch.Tensor  # (B, P + R) 1 on real tokens
    R: int  # response columns
    resp_mask: torch.Tensor  # (B, R) float, 1 on response tokens up to and including EOS
    no_eos: torch.Tensor  # (B,) bool: cut at max_new_tokens before emitting EOS


@torch.no_grad()
def sample_responses(policy, prompts, max_new_tokens, generator, device, ctx=nullcontext(), temperature=1.0, top_k=0,
                     top_p=1.0, batch_size=0, desc=None):
    """The one sampling helper of every stage: one response per prompt string, to a fixed maximum length, everything
    after the first EOS padding (the batch layout above). A too-long prompt keeps its end. batch_size > 0 samples in
    chunks of that many rows (with a progress bar named desc); the result is one Samples either way."""
    room = policy.config.block_size - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                          f"block_size={policy.config.block_size} (use --max_new_tokens={policy.config.block_size // 2}"
                          f" or less)")
    prompt_ids = [encode_prompt(p)[-room:] for p in prompts]
    size = batch_size or max(1, len(prompts))
    responses = []
    for i in tqdm(range(0, len(prompts), size), desc=desc, disable=None if desc else True, leave=False):
        ids, mask = pad_batch(prompt_ids[i:i + size], side="left")
        with ctx:
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            tokens, tmask = policy.generate(ids, mask, max_new_tokens, temperature, top_k, top_p, generator=generator)
        responses += [t[:n] for t, n in zip(tokens.tolist(), tmask.sum(1).tolist())]  # up to and including EOS
    ids, mask, R = layout_batch(prompt_ids, responses, device)
    return Samples(list(prompts), [decode(r) for r in responses], ids, mask, R, mask[:, -R:].float(),
                   torch.tensor([len(r) == 0 or r[-1] != EOS for r in responses]).to(device, non_blocking=True))


def response_logprobs(model, ids, mask, n_response, temperature=1.0, with_entropy=False):
    """Per-token log-probabilities of the last n_response columns of ids (the response), under `model`.

    ids, mask: (B, P + R) in the project's layout, R = n_response. Logits only at the R positions that predict
    response tokens, divided by the sampling temperature: the same T for old, new and reference log-probs (Huang
    et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031). Returns logp (B, R), 0 where
    mask is 0, and, with_entropy, the entropy (B, R) of each predictive distribution (0 where mask is 0; no
    gradient). Every algorithm (SFT, DPO, PPO, RLOO, GRPO, evaluation) uses this."""
    h = model.hidden(ids, mask)[:, -n_response - 1:-1]  # (B, R, C): position t predicts token t + 1
    targets = ids[:, -n_response:].clamp(max=N_REAL_TOKENS - 1)  # PAD (50257) -> any real id; masked below
    logp, entropy = token_logprobs(model, h, targets, temperature, with_entropy)
    resp_mask = mask[:, -n_response:].float()
    return (logp * resp_mask, entropy * resp_mask) if with_entropy else logp * resp_mask


def matmul_dtype(model, device_type):
    """The dtype the model's matrix products run in on device_type: autocast's when it is on, else the weights'."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else \
        model.lm_head.weight.dtype


def token_logprobs(model, h, targets, temperature=1.0, with_entropy=True):
    """log p(targets) (...) and the entropy (...) of model's next-token distributions at hidden states h (..., C).
    Plain PyTorch (plain_token_logprobs) holds (..., 50,257) float32 numbers twice, plus their gradient: the largest
    tensors of every step. TokenLogProbs makes them a slice of rows at a time; a compiled model runs the plain function
    through inductor, which fuses its passes but keeps the logits for backward (tests/test_model.py checks all)."""
    if "compiled_logprobs" in model.__dict__ and targets.numel():  # COMPILED_ROWS rows a call
        hs, ts, n = h.reshape(-1, h.size(-1)), targets.reshape(-1), COMPILED_ROWS
        logp, entropy = (torch.cat(x).view(targets.shape) for x in zip(*(
            model.compiled_logprobs(model, hs[i:i + n], ts[i:i + n], temperature) for i in range(0, len(ts), n))))
        return logp, entropy if with_entropy else torch.zeros_like(entropy)
    logp, entropy = TokenLogProbs.apply(h.reshape(-1, h.size(-1)), model.lm_head.weight, targets.reshape(-1),
                                        temperature, matmul_dtype(model, h.device.type), with_entropy)
    return logp.view(targets.shape), entropy.view(targets.shape)


def plain_token_logprobs(model, h, targets, temperature=1.0):
    """token_logprobs in plain PyTorch: log p(targets) (...) and the entropy (..., no gradient); float32 at least."""
    z = model.logits(h)  # (..., 50257)
    logp_all = F.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)) / temperature, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), entropy.detach()


class TokenLogProbs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] for each row of h (N, C), with W the whole padded unembedding (V, C): aligned
    products, as in model.logits; the padding's columns stay out of the softmax. ROWS rows at a time (product in
    `dtype`, the autocast dtype; softmax in float32), made again in backward (d logp / d logits = onehot(target) -
    softmax): one more product, for memory that no longer grows with N x V. Below KEEP numbers (N x V: the tests', a
    CPU's small batches) forward keeps the softmax slices for backward instead. (Wijmans et al. 2024, "Cut Your
    Losses in Large-Vocabulary Language Models", go further in one kernel.) Returns logp (N,) float32 and the entropy
    (N,) (zeros unless with_entropy; no gradient). On a CPU the slices stay below glibc's 32 MB heap-block limit
    (runtime.keep_freed_memory): a larger one would be mapped, zeroed and unmapped at every use (slow)."""
    ROWS = {"cuda": 1024, "cpu": 128}  # rows per slice: 1024 x 50,304 float32 = 206 MB on a GPU, 26 MB on a CPU
    KEEP = 1 << 26  # softmax entries kept for backward at most: 256 MB of float32

    @staticmethod
    def logits(h, w, temperature):  # (n, C), (V, C) in the product's dtype -> (n, V) float32 (float64 stays)
        z = (h.to(w.dtype) @ w.t()).to(torch.promote_types(w.dtype, torch.float32))
        return z if temperature == 1 else z.div_(temperature)

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, dtype, with_entropy):
        acc = torch.promote_types(dtype, torch.float32)
        logp = torch.empty(h.size(0), device=h.device, dtype=acc)
        entropy = torch.zeros(h.size(0), device=h.device, dtype=acc)
        lse = torch.empty(h.size(0), device=h.device, dtype=acc)  # log of the softmax's denominator, per row
        rows, w = TokenLogProbs.ROWS.get(h.device.type, TokenLogProbs.ROWS["cpu"]), weight.to(dtype)
        keep = any(ctx.needs_input_grad[:2]) and h.size(0) * weight.size(0) <= TokenLogProbs.KEEP
        ctx.softmax = []  # with keep: each slice's softmax, for backward
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.size(0), rows):
                z = (zf := TokenLogProbs.logits(h[i:i + rows], w, temperature))[:, :N_REAL_TOKENS]  # tokens: a view
                lse[i:i + len(z)] = z.logsumexp(-1)
                logp[i:i + len(z)] = z.gather(-1, targets[i:i + len(z), None]).squeeze(-1) - lse[i:i + len(z)]
                if with_entropy or keep:  # log p = z - lse; H = -sum_v p_v log p_v
                    logp_all = z.sub_(lse[i:i + len(z), None])
                    zf[:, N_REAL_TOKENS:] = -math.inf
                    p = zf.exp()  # (n, V), 0 on the padding
                    if with_entropy:
                        entropy[i:i + len(z)] = -(p[:, :N_REAL_TOKENS] * logp_all).sum(-1)
                    if keep:
                        ctx.softmax.append(p)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.dtype = temperature, dtype
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _):
        h, weight, targets, lse = ctx.saved_tensors
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(ctx.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if ctx.needs_input_grad[1] else None
        rows, w = TokenLogProbs.ROWS.get(h.device.type, TokenLogProbs.ROWS["cpu"]), weight.to(ctx.dtype)
        with torch.autocast(h.device.type, enabled=False):
            for i in range(0, h.size(0), rows):
                hi, g = h[i:i + rows], grad_logp[i:i + rows, None]  # (n, C), (n, 1)
                if ctx.softmax:
                    p = ctx.softmax[i // rows]
                else:  # the softmax again, in place, 0 on the padding
                    p = TokenLogProbs.logits(hi, w, ctx.temperature)
                    p[:, :N_REAL_TOKENS].sub_(lse[i:i + rows, None]).exp_()
                    p[:, N_REAL_TOKENS:] = 0
                dz = p.mul_(-g).scatter_add_(-1, targets[i:i + len(hi), None], g)  # (n, V) d loss / d (z / T)
                dz = (dz if ctx.temperature == 1 else dz.div_(ctx.temperature)).to(ctx.dtype)
                if grad_h is not None:
                    grad_h[i:i + len(hi)] = dz @ w
                if grad_w is not None:
                    grad_w += (dz.t() @ hi.to(ctx.dtype)).to(acc)
        ctx.softmax = []  # used up (multiplied in place): a second backward (retain_graph) makes them again
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


class ScalarHead(nn.Module):
    """A linear head that reads one number from a hidden state: the reward model's score or the critic's value.

    Init as OpenAI's lm-human-preferences (https://github.com/openai/lm-human-preferences, kept by Huang et al.
    2024, https://arxiv.org/abs/2403.17031): weight ~ N(0, 1 / sqrt(d + 1)), bias 0."""

    def __init__(self, n_embd):
        super().__init__()
        self.proj = nn.Linear(n_embd, 1)
        nn.init.normal_(self.proj.weight, std=1 / math.sqrt(n_embd + 1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, h):  # (B, T, C) -> (B, T)
        return self.proj(h).squeeze(-1)


def last_real_index(mask):
    """Column of each row's last real token, for right- or left-padded rows: (B, T) -> (B,)."""
    cols = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), cols, torch.full_like(cols, -1)).max(1).values
