"""
The tiny GPT that every stage trains: GPT-2's architecture, padding-aware, with a preallocated KV cache for
batched sampling, the one helper that turns logits into per-token log-probs, and a scalar head for reward models
and critics.

Layout used everywhere in this project: a batch of prompt + response sequences is stored as
    [ left-padded prompt | right-padded response ]        ids (B, P + R), mask (B, P + R), 1 = real token
so every response starts at column P, and the logits that predict it are those of columns P-1 .. P+R-2.

Simplifications on purpose:
- Padding is handled with an explicit boolean attention mask (SDPA's memory-efficient kernel); only a batch with
  no padding at all takes the flash path (is_causal=True). Fine at toy sizes; a packed/varlen kernel would be the
  next step.
- Decoding attends over the whole preallocated cache every step (a mask hides empty slots). That keeps every
  shape static, so one step can be captured as a CUDA graph, at the price of O(block_size) work per token.
- Ids >= 50257 (GPT-2 has 50257 real tokens; the table is padded to 50304, and PAD = 50257) are removed from
  every softmax: they can never be sampled and never take probability mass in a log-prob.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

N_REAL_TOKENS = 50257  # GPT-2's vocabulary; ids above are padding of the embedding table (and our PAD)


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
    """Preallocated keys and values for every layer, plus which slots hold real tokens.

    k, v: (n_layer, B, H, T, hd); valid: (B, T) bool. Nothing is ever reallocated, so the decoding step has static
    shapes and addresses (what CUDA graph capture needs)."""

    def __init__(self, cfg, batch_size, length, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_head, length, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, length, dtype=torch.bool, device=device)


def attention_mask(valid, q_idx):
    """(B, 1, Tq, Tk) bool: query at absolute slot q_idx[i] sees real keys at slots <= its own.

    Each query also always sees itself, so a padding query (left padding has no real key before it) gets a
    well-defined softmax instead of NaN; its output is never used."""
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

    def hidden(self, idx, mask=None, cache=None, cache_idx=None):
        """Final hidden states (B, T, C) of tokens idx (B, T).

        mask (B, T): 1 on real tokens (None: all real, the fast causal path). Position ids count real tokens only
        (cumsum(mask) - 1), so left padding changes nothing for real tokens. With a cache, the T tokens go into
        slots cache_idx (T,) and attend to everything already there."""
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
            kv = [(cache.k[i], cache.v[i]) for i in range(len(self.transformer.h))]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block, layer_kv in zip(self.transformer.h, kv):
            if getattr(self, "grad_checkpoint", False) and cache is None and torch.is_grad_enabled():
                # --grad_checkpoint: keep only each block's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, layer_kv, cache_idx)
        return self.transformer.ln_f(x)

    def logits(self, h):
        """Logits over GPT-2's real vocabulary only: (..., C) -> (..., 50257)."""
        return self.lm_head(h)[..., :N_REAL_TOKENS]

    def forward(self, idx, targets=None, mask=None):
        """nanoGPT's interface: logits (B, T, 50257) and, given targets (B, T), the mean cross-entropy over
        targets that are not -1."""
        logits = self.logits(self.hidden(idx, mask))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompt, prompt_mask, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                 eos_id=50256, pad_id=50257, generator=None, cache_dtype=None):
        """Sample continuations of left-padded prompts (B, P) with mask (B, P).

        Returns (tokens, mask), both (B, max_new_tokens): the sampled ids, and 1 on every sampled token up to and
        including the first EOS. After its EOS a row emits pad_id (its mask is 0). temperature 0 is greedy.
        Sampling draws from `generator` only, so a seeded generator gives the same samples on the same device."""
        check_top_p(top_p)
        B, P = prompt.shape
        assert P + max_new_tokens <= self.config.block_size, "prompt + max_new_tokens exceeds block_size"
        dev = prompt.device
        cache = KVCache(self.config, B, P + max_new_tokens, dev, cache_dtype or self.lm_head.weight.dtype)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        h = self.hidden(prompt, prompt_mask, cache, torch.arange(P, device=dev))[:, -1]  # prefill: (B, C)
        for t in range(max_new_tokens):
            tok = sample_token(self.logits(h).float(), temperature, top_k, top_p, generator)  # (B,)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out[:, t] = tok
            done = done | (tok == eos_id)
            if t + 1 == max_new_tokens or (t % 16 == 15 and bool(done.all())):  # one host sync per 16 tokens
                break
            step_idx = torch.full((1,), P + t, device=dev, dtype=torch.long)
            h = self.hidden(tok[:, None], None, cache, step_idx)[:, -1]
        return out, response_mask(out, eos_id, pad_id)


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
    # float64's precision (see sampling_cdf). One uniform per row and no host sync: on a CPU, drawing a noise value
    # per vocabulary entry (Gumbel-max, or torch.multinomial) costs ten times the rest of the step. u stays strictly
    # below the total, so a token of probability 0 (cut by top-k/top-p) is never chosen.
    cdf = sampling_cdf(logits, temperature, top_k, top_p)  # (B, V) float64
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=cdf.device, dtype=cdf.dtype) * total  # 2^-53 grid
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def response_mask(tokens, eos_id=50256, pad_id=50257):
    """1 on every token up to and including the first EOS, 0 after it (and on padding)."""
    is_eos = (tokens == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first EOS
    return ((~after_eos) & (tokens != pad_id)).long()


def response_logprobs(model, ids, mask, n_response, temperature=1.0, with_entropy=False):
    """Per-token log-probabilities of the last n_response columns of ids (the response), under `model`.

    ids, mask: (B, P + R) in the project's layout, R = n_response. Logits are computed only at the R positions
    that predict response tokens, divided by the sampling temperature: the same T for old, new and reference
    log-probs, as in Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
    https://arxiv.org/abs/2403.17031. Returns logp (B, R), 0 where mask is 0, and, with_entropy, the entropy (B, R)
    of each predictive distribution (0 where mask is 0). Every algorithm (SFT, DPO, PPO, RLOO, GRPO,
    evaluation) uses this."""
    h = model.hidden(ids, mask)[:, -n_response - 1:-1]  # (B, R, C): position t predicts token t + 1
    logits = model.logits(h).float() / temperature  # (B, R, V)
    logp_all = F.log_softmax(logits, dim=-1)
    targets = ids[:, -n_response:]
    resp_mask = mask[:, -n_response:].to(logp_all.dtype)
    logp = logp_all.gather(-1, targets.clamp(max=logits.size(-1) - 1).unsqueeze(-1)).squeeze(-1) * resp_mask
    if not with_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1) * resp_mask
    return logp, entropy


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
    T = mask.size(1)
    cols = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), cols, torch.full_like(cols, -1)).max(1).values
