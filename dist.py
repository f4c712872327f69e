"""
The torchrun plumbing of every training stage: which process this is, each process's share of a batch, sums, means
and masked statistics across processes, and the gradient sum of the one optimizer step (runtime.optimizer_step).

Several processes: `torchrun --nproc_per_node=N train.py STAGE ...` (python -m torch.distributed.run) runs sft,
reward, dpo, ppo, rloo, grpo and bon unchanged, NCCL with one GPU per process on CUDA, gloo on the CPU. Without
torchrun (WORLD_SIZE unset) nothing below happens: no process group, no collective, the same numbers as before.
- --batch_size is the global batch. Each process takes a contiguous share of the step's items (my_share), in
  micro-batches of --micro_batch_size (gradient accumulation); each loss is weighted by its share of the global
  batch (items, or response tokens for SFT pairs and the RL losses), so the summed gradient is the global batch's
  and the loss curve is the same for any number of processes and any micro-batch size (up to float rounding).
- Gradients are summed across processes by our own GradSum, made with the optimizer and finished by the one
  optimizer step before the clipping, not by wrapping the models in DistributedDataParallel. Why: our losses reach
  the weights through model.hidden and model.response_logprobs, and PPO's critic and policy share one optimizer
  (and, with --critic=shared, one trunk); DDP's gradient hooks are armed by its wrapper's forward(), which these
  calls bypass, and routing every stage through it would need a forward() per loss shape. GradSum does what DDP
  does: buckets of gradients summed (all_reduce) as the backward pass of the step's last micro-batch completes them,
  overlapped with the rest of that pass; one exchange per optimizer step whatever the accumulation.
- Every process starts from rank 0's weights (make_optimizer broadcasts them) and takes the same steps, so every
  process holds the same weights; rank 0 alone writes the run folder (lock, config.json, metrics, summary,
  checkpoints) and prints. Random streams are offset per rank (rank_seed); rank 0 draws what one process draws.
  A stop request (SIGTERM to torchrun, which passes it on) is agreed by all processes at the end of a step, and
  --resume works under torchrun with any number of processes.
- The RL stages: each process samples its share of the step's prompts (all k samples of a prompt on one process,
  so RLOO and GRPO groups are never split); whitening, the adaptive KL controller's KL and the logged metrics are
  over all processes' samples; minibatches are per process, as many on each as the global batch has.
"""
import os
import re
import sys

import torch
import torch.distributed as tdist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from config import ConfigError, TrainingError
from data import derived_seed


_COMM_DEVICE = "cpu"  # where collectives' tensors live: the process's GPU with NCCL, the CPU with gloo


def world():
    """Processes of the run: torchrun's WORLD_SIZE, 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    return int(os.environ.get("RANK", "0"))


def is_main():
    """Rank 0 alone writes the run folder, holds its lock and prints."""
    return rank() == 0


class _NotATerminal:
    """stderr of ranks > 0: what they write still shows (errors, warnings), but tqdm and Run.log see no terminal,
    so one progress bar shows, rank 0's."""

    def __init__(self, stream):
        self.stream = stream

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self.stream, name)


def init_distributed(cfg):
    """Join torchrun's process group (its environment: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK):
    NCCL with one GPU per process (cuda:LOCAL_RANK) when the run is on CUDA, gloo on the CPU. Ranks > 0 print
    nothing to stdout."""
    global _COMM_DEVICE
    if world() == 1 or tdist.is_initialized():
        return
    device = getattr(cfg, "device", "cpu")
    if re.fullmatch(r"cuda:\d+|mps", device):
        raise ConfigError(f"--device={device}: under torchrun each process takes the GPU of its LOCAL_RANK; use "
                          f"--device=cuda (or auto), or --device=cpu")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        _COMM_DEVICE = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(_COMM_DEVICE)
    tdist.init_process_group("nccl" if cuda else "gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")
        sys.stderr = _NotATerminal(sys.stderr)


def rank_seed(*keys):
    """The seed of a random stream, offset per rank: derived_seed(*keys, rank) on ranks > 0; on rank 0, and in one
    process, derived_seed(*keys) (one key: the key itself), so that rank 0 draws what a one-process run draws (the
    weights of a model from scratch among them)."""
    if rank() > 0:
        return derived_seed(*keys, rank())
    return keys[0] if len(keys) == 1 else derived_seed(*keys)


def my_share(items):
    """This process's part of a global batch (a list or range): a contiguous slice, sizes differing by at most one.
    The whole batch in one process."""
    n, r, w = len(items), rank(), world()
    return items[n * r // w:n * (r + 1) // w]


def micro_batches(items, size, optimizer=None):
    """This process's share of a global batch cut into micro-batches of at most `size` items (0: one), for gradient
    accumulation. A process whose share is empty gets none (and contributes no gradient). With the optimizer given,
    its gradient sum starts during the last micro-batch's backward pass (accumulate)."""
    mine = my_share(items)
    size = size or max(1, len(mine))
    parts = [mine[i:i + size] for i in range(0, len(mine), size)]
    return accumulate(parts, optimizer, len(items) >= world()) if optimizer is not None else parts


def accumulate(parts, optimizer, every_process=True):
    """Yield the micro-batches of one optimizer step; under torchrun, before the last one, arm the optimizer's
    GradSum, so that the gradient sum over the processes starts during that micro-batch's backward pass.
    every_process: every process has a micro-batch in this step (a global fact, the same on each process: a process
    with none runs no backward, so none may start a sum, and the step sums them all at the end instead)."""
    parts = list(parts)
    for i, part in enumerate(parts):
        if i == len(parts) - 1 and every_process and getattr(optimizer, "grad_sum", None) is not None:
            optimizer.grad_sum.arm()
        yield part


def world_note(cfg):
    """The printed split of a step's batch over processes and micro-batches ("" in one process without them)."""
    per = -(-cfg.batch_size // world())
    return ((f"; {world()} processes, up to {per} sequences each" if world() > 1 else "")
            + (f"; micro-batches of {cfg.micro_batch_size}" if 0 < cfg.micro_batch_size < per else ""))


def all_sum(x):
    """A number or tensor summed over the processes (x itself in one process)."""
    if world() == 1:
        return x
    t = torch.as_tensor(x, dtype=x.dtype if isinstance(x, torch.Tensor) else torch.float64).to(_COMM_DEVICE,
                                                                                                   copy=True)
    tdist.all_reduce(t)
    return t.to(x.device) if isinstance(x, torch.Tensor) else t.item()


def global_means(**xs):
    """The mean of each tensor's entries over every process's tensor of that name, as floats ({name: mean}): one
    collective and one host sync for them all."""
    if world() == 1:
        return dict(zip(xs, torch.stack([x.float().mean() for x in xs.values()]).tolist()))
    sums = all_sum(torch.stack([torch.stack([x.double().sum(), x.new_tensor(x.numel(), dtype=torch.float64)])
                                for x in xs.values()])).tolist()
    return {name: s / max(n, 1) for name, (s, n) in zip(xs, sums)}


def global_mean(x):
    """The mean of tensor x's entries over every process's x, as a float."""
    return global_means(x=x)["x"]


def all_mean(metrics, n):
    """Means (a dict of floats) over each process's n items -> the means over all processes' items."""
    if world() == 1:
        return metrics
    # a process with no items (fewer items than processes) counts zero, not its mean of nothing (NaN)
    sums = all_sum(torch.tensor([v * n if n else 0.0 for v in metrics.values()] + [n], dtype=torch.float64)).tolist()
    return {k: v / max(sums[-1], 1) for k, v in zip(metrics, sums)}


def masked_sums(x, mask):
    """(sum of the real entries, their count), over every process's rows: the statistics of a global batch (PPO's
    whitening, explained variance and Llama 2's score whitening)."""
    return all_sum(torch.stack([torch.where(mask.bool(), x, 0.0).sum(), mask.sum().to(x.dtype)]))


def masked_mean(x, mask):
    total, n = masked_sums(x, mask)
    return total / n.clamp(min=1)


def masked_var(x, mask):
    """Unbiased variance of the real entries (as N+'s masked_var)."""
    total, n = masked_sums((x - masked_mean(x, mask)) ** 2, mask)
    return total / n.clamp(min=1) * n / (n - 1).clamp(min=1)


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the real entries, 0 elsewhere; shift_mean=False adds the mean back (N+'s whiten)."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    return torch.where(mask.bool(), out if shift_mean else out + mean, 0.0)


def any_rank(flag):
    """True on every process when it is true on any (a stop request: every process stops after the same step)."""
    return flag if world() == 1 else all_sum(float(flag)) > 0


def from_rank0(obj):
    """Rank 0's value of a picklable object, on every process."""
    if world() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=torch.device(_COMM_DEVICE))
    return box[0]


def gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] (picklable objects), on every process; [obj] in one process."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    tdist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_from_rank0(model):
    for t in list(model.parameters()) + list(model.buffers()):
        tdist.broadcast(t.data, src=0)


class GradSum:
    """The gradient sum over the processes, overlapped with the backward pass of each optimizer step's last
    micro-batch (DistributedDataParallel's bucketing, on our own optimizer step; see the module's docstring).

    The trainable parameters are cut into buckets of up to 2^23 numbers, in reverse order (the output end of a model
    gets its gradients first); 2^25 made the 2-GPU PPO benchmark 10% slower (RESULTS.md). A hook on each parameter
    (register_post_accumulate_grad_hook) counts the gradients that are complete; once a bucket's are, it is flattened
    and its all_reduce starts (async_op), while backward goes on through the earlier layers. Buckets start strictly
    in order, so every process issues the same sequence of collectives whatever the order its hooks fire in.
    optimizer_step then waits for them (finish).

    Which parameters get a gradient is learnt from the first optimizer step, summed at its end as before
    (all_reduce_grads, which agrees it over the processes); a later step whose loss reaches a parameter the first
    did not is stopped with an error, as a gradient missing from the sum would train silently wrong. Hooks are armed
    only for the last micro-batch of a step whose every process has one (accumulate): gradients of earlier
    micro-batches are still partial, and a process without a micro-batch runs no backward.

    Between the last micro-batch's backward and optimizer_step no other collective may run (a loss check or a
    metric summed over processes goes after the step): by then one process may have started more buckets than
    another, and a collective in between would be paired with a bucket's. The buckets' flat copies are held until
    the step, one gradient's worth of memory more (DDP's buckets hold as much)."""

    def __init__(self, model, bucket_numel=2**23):
        params = [p for p in model.parameters() if p.requires_grad][::-1]
        self.buckets, size = [], 0
        for p in params:
            if not self.buckets or size + p.numel() > bucket_numel or p.dtype != self.buckets[-1][0].dtype:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel()
        self.index = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self.names = {p: name for name, p in model.named_parameters()}
        self.expected, self.armed, self.works = None, False, []  # expected: per bucket, what the first step reached
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def arm(self):
        """Start summing as this backward pass completes buckets (from the second optimizer step on)."""
        if self.expected is not None:
            self.armed, self.fired, self.works = True, [set() for _ in self.buckets], []

    def _ready(self, p):
        if not self.armed:
            return
        i = self.index[p]
        if p not in self.expected[i]:
            self._unexpected(p)
        if p in self.fired[i]:  # a second backward through p: its bucket's sum may have started without this part
            raise TrainingError(f"parameter {self.names[p]} got a second gradient in an optimizer step's last "
                                f"micro-batch; under torchrun each gets one gradient per micro-batch (GradSum)")
        self.fired[i].add(p)
        while len(self.works) < len(self.buckets) and self.fired[len(self.works)] >= self.expected[len(self.works)]:
            self._start(len(self.works))

    def _unexpected(self, p):
        raise TrainingError(f"parameter {self.names[p]} got a gradient that the first optimizer step's loss did not "
                            f"give it; under torchrun every step's loss must reach the same parameters (GradSum)")

    def _start(self, i):
        grads = [p.grad for p in self.buckets[i] if p in self.expected[i]]
        flat = _flatten_dense_tensors(grads) if grads else None
        self.works.append((grads, flat, tdist.all_reduce(flat, async_op=True) if grads else None))

    @torch.no_grad()
    def finish(self, model):
        """The sum of this step's gradients, on every process: wait for the buckets started during backward and
        sum the others now. The first step (or one whose hooks were not armed) sums them all here."""
        if not self.armed:
            all_reduce_grads(model)
            if self.expected is None:
                self.expected = [{p for p in bucket if p.grad is not None} for bucket in self.buckets]
            return
        for bucket, expected in zip(self.buckets, self.expected):
            for p in bucket:
                if p.grad is not None and p not in expected:
                    self._unexpected(p)
            for p in expected:
                if p.grad is None:  # reached by the first step's loss, not by this micro-batch's: counts zero
                    p.grad = torch.zeros_like(p)
        while len(self.works) < len(self.buckets):
            self._start(len(self.works))
        for grads, flat, work in self.works:
            if work is not None:
                work.wait()
                for old, new in zip(grads, _unflatten_dense_tensors(flat, grads)):
                    old.copy_(new)
        self.armed, self.works = False, []


@torch.no_grad()
def all_reduce_grads(model, bucket_numel=2**26):
    """Sum every trainable parameter's gradient over the processes, in flat buckets of up to 2^26 numbers (one
    all_reduce each). A parameter that has no gradient on some process (its share of the batch was empty) counts
    zero there; one that has none anywhere keeps none, as in one process. Each process's loss is its share of the
    global batch's loss (weighted by its share of the batch's items or tokens), so the sum is the gradient of the
    global batch: the same for any number of processes."""
    params = [p for p in model.parameters() if p.requires_grad]
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    tdist.all_reduce(used)
    grads = []
    for p, u in zip(params, used.tolist()):
        if u and p.grad is None:
            p.grad = torch.zeros_like(p)
        if u:
            grads.append(p.grad)
    bucket, size = [], 0
    for g in grads + [None]:
        if bucket and (g is None or size + g.numel() > bucket_numel or g.dtype != bucket[0].dtype):
            flat = _flatten_dense_tensors(bucket)
            tdist.all_reduce(flat)
            for old, new in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                old.copy_(new)
            bucket, size = [], 0
        if g is not None:
            bucket.append(g)
            size += g.numel()


def shutdown():
    """Leave the process group once every process has finished the run: a barrier, then destroy it. Without this the
    communication threads can still be alive while the interpreter exits, and the process then aborts (SIGABRT,
    "terminate called without an active exception": seen in the tests, after a run that had succeeded); train.py
    also skips the interpreter's teardown under torchrun."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
