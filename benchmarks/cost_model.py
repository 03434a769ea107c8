"""Cost model of the core op's implementations: GEMM FLOPs, HBM bytes, extra memory and a time floor on a GPU.

    python -m benchmarks.cost_model                                   # target shapes, H200 rates, markdown table
    python -m benchmarks.cost_model --n 8192 --h 4096 --v 151936 --matmul-tflops 790 --bandwidth-tbs 4.0 --json out.json

Predicted time = GEMM FLOPs / matmul rate + non-GEMM bytes / bandwidth (GEMMs and folds run one after the other
on one stream; GEMM operand reads are inside the matmul rate, GEMM outputs are traffic). "% of roofline" is the
floor over the predicted time; the floor is 4 GEMM passes of 2 N H V for two contexts (the forward of each, dH
and dW: nothing can skip them) and 3 for one, at the matmul rate.
The case: two contexts sharing a bf16 lm_head, forward + backward of logp + entropy + divergence (one context,
logp + entropy, for "ce").

How each implementation is counted:
- ``ours``: the lean mode at 256 MB: the chunk loop with the chunk sizes
  :func:`pydistill.token_stats.loop.plan_chunks` (and, for JSD and the clip,
  :func:`~pydistill.token_stats.loop.plan_resident`) picks, counted pass by pass below (float32 logits written
  by cuBLAS and read by a fold, bf16 dlogits, dH accumulation): 6 passes for two contexts, 4 for one.
- ``ours-fast``: the fast mode at the default 4096 MB (:func:`pydistill.token_stats.fast.plan_fast`): the
  rows whose bf16 gradient basis fits form it in the forward from resident logits (4 passes for two contexts,
  3 for one); the rest run lean. Counted pass by pass, W read once per resident row block.
- ``compile``: ``torch.compile`` of the plain loss a user writes (only what the loss needs): one GEMM per context
  writing bf16 logits, fused kernels reading them in the forward and writing bf16 dlogits in the backward, dH
  and dW GEMMs: 4 passes for two contexts, 3 for one; the logits stay alive for the backward.
- ``eager``: the float32-statistics eager loss of ``pydistill.token_stats.eager`` run on ``meta`` tensors
  of the real shape under a dispatch mode that adds up every op's input and output bytes, the GEMMs' FLOPs and
  the peak of live tensors: op by op, as PyTorch eager runs it (no fusion).
- ``trl``: TRL 1.16's ``ChunkedDivergenceFunction`` / ``ChunkedLogProbFunction`` as written there: token chunks
  of 4096, vocabulary chunks of 32768, one GEMM per context, float32 tile buffers, a float32 [V, H] dW buffer,
  dlogits cast to bf16 per tile. It has no pointwise clip and no entropy gradient.
- ``liger``: Liger-Kernel 0.8's fused-linear distillation loss: row chunks of 1024, each chunk's loss and its
  gradient formed in the forward by a compiled autograd graph (counted like ``compile``, per chunk: 4 passes),
  dW accumulated in bf16.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pydistill.token_stats import fast, loop
from pydistill.token_stats.config import StatsConfig
from pydistill.token_stats.eager import eager_token_stats

TARGETS = [(8192, 4096, 151936), (8192, 4096, 128256), (2048, 576, 49152)]
H200 = dict(matmul_tflops=790.0, bandwidth_tbs=4.0)  # measured bf16 matmul rate (gpu-path.md); ~83% of 4.8 TB/s
VARIANTS = {  # name: (divergence, clip, contexts)
    "ce": (None, None, 1), "forward_kl": ("forward_kl", None, 2), "reverse_kl": ("reverse_kl", None, 2),
    "jsd": ("jsd", None, 2), "forward_kl-clip": ("forward_kl", 0.05, 2),
}
GEMM_OPS = {"mm", "addmm", "bmm", "matmul"}
VIEW_OPS = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "slice", "select",
            "permute", "alias", "detach", "as_strided", "reshape", "_reshape_alias"}


def floor_flops(n, h, v, variant) -> int:
    """The GEMM work no design can skip: the forward of every context, dH and dW (2 N H V each): 4 passes for
    two contexts, 3 for one."""
    contexts = VARIANTS[variant][2]
    return (contexts + 2) * 2 * n * h * v


class _Counter(TorchDispatchMode):
    """Bytes read + written and GEMM FLOPs of every op, and the peak bytes of live op outputs."""

    def __init__(self):
        super().__init__()
        self.bytes = self.flops = self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in VIEW_OPS:
            return out
        tensors_in = [a for a in _flat(args) + _flat(list((kwargs or {}).values())) if isinstance(a, torch.Tensor)]
        tensors_out = [o for o in _flat([out]) if isinstance(o, torch.Tensor)]
        if name in GEMM_OPS:  # operand reads are inside the matmul rate; the output is traffic
            a, b = [t for t in tensors_in if t.dim() >= 2][-2:]
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1]
            tensors_in = [t for t in tensors_in if t.dim() < 2]
        self.bytes += sum(t.numel() * t.element_size() for t in tensors_in + tensors_out)
        for t in tensors_out:
            size = t.numel() * t.element_size()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, size)
        return out

    def _free(self, size):
        self.live -= size


def _flat(items):
    out = []
    for x in items:
        out.extend(_flat(x) if isinstance(x, (list, tuple)) else [x])
    return out


def _meta_inputs(n, h, v, dtype, contexts):
    hidden = torch.empty(n, h, device="meta", dtype=dtype, requires_grad=True)
    weight = torch.empty(v, h, device="meta", dtype=dtype, requires_grad=True)
    teacher = torch.empty(n, h, device="meta", dtype=dtype) if contexts == 2 else None
    return hidden, weight, teacher, torch.zeros(n, device="meta", dtype=torch.long)


def _count_eager(n, h, v, variant, dtype=torch.bfloat16):
    divergence, clip, contexts = VARIANTS[variant]
    hidden, weight, teacher, targets = _meta_inputs(n, h, v, dtype, contexts)
    cfg = StatsConfig(divergence=divergence, beta=0.5, clip=clip, has_targets=True)
    with _Counter() as counter:
        logp, entropy, div = eager_token_stats(hidden, weight, cfg, teacher_hidden=teacher,
                                                   teacher_weight=weight if teacher is not None else None,
                                                   targets=targets, dtype=None)
        (logp.sum() + entropy.sum() + div.sum()).backward()
    return counter


def eager(n, h, v, variant):
    counter = _count_eager(n, h, v, variant)
    return dict(flops=counter.flops, bytes=counter.bytes, extra_mb=counter.peak / 2 ** 20,
                note="op-by-op count on meta tensors")


def ours(n, h, v, variant, dtype=torch.bfloat16, budget_mb=loop.LEAN_BUDGET_MB):
    divergence, clip, contexts = VARIANTS[variant]
    plan = loop.plan_chunks(n, h, h, v, dtype, torch.device("cuda"), two_contexts=contexts == 2,
                            shared_head=True, triton_folds=True, budget_mb=budget_mb)
    e = torch.empty((), dtype=dtype).element_size()
    groups = math.ceil(v / plan.group)
    sweeps = 1 + (contexts == 2 and (divergence == "jsd" or clip is not None))
    nv = n * v
    resident = loop.plan_resident(n, h, v, dtype, torch.device("cuda"), shared_head=True, triton_folds=True,
                                  budget_mb=budget_mb) if sweeps == 2 else None
    # forward sweeps: cuBLAS writes float32 logits of every context, the fold reads them; with resident rows
    # the second sweep re-reads the same logits instead of recomputing them, and W is read once per row block
    fwd_bytes = sweeps * contexts * nv * 4 * 2
    if resident is not None:
        fwd_bytes = contexts * nv * 4 * 3 + math.ceil(n / resident.rows) * v * h * e
    if plan.stacked:
        fwd_bytes += sweeps * 2 * n * h * e * 2
    # backward: recompute (write + read), bf16 dlogits written once and read by the dH and dW GEMMs,
    # the float32 dH accumulator read and written by every chunk's addmm, dW written once, the final dH cast
    bwd_bytes = contexts * nv * 4 * 2 + nv * e * 3 + groups * n * h * 4 * 2 + v * h * e + n * h * (4 + e)
    flops = (1 if resident else sweeps) * 2 * contexts * n * h * v + 2 * contexts * n * h * v + 4 * n * h * v
    extra = contexts * plan.rows * plan.cols * 4 + plan.rows * plan.group * e + n * h * 4
    extra += 2 * plan.rows * h * e if plan.stacked else 0
    return dict(flops=flops, bytes=fwd_bytes + bwd_bytes, extra_mb=extra / 2 ** 20,
                note=f"rows {plan.rows}, chunk {plan.cols}, dlogits group {plan.group}"
                     + (", stacked GEMM" if plan.stacked else "")
                     + (f"; forward: resident blocks of {resident.rows} rows" if resident else ""))


def ours_fast(n, h, v, variant, dtype=torch.bfloat16, budget_mb=loop.DEFAULT_MEMORY_BUDGET_MB,
              rates=(H200["matmul_tflops"], H200["bandwidth_tbs"])):
    """Fast rows pass by pass (below); lean rows, when the basis does not fit them all, as :func:`ours`."""
    divergence, clip, contexts = VARIANTS[variant]
    plan = fast.plan_fast(n, h, v, dtype, torch.device("cuda"), outputs=1, two_contexts=contexts == 2,
                          shared_head=True, triton_folds=True, budget_mb=budget_mb)
    if plan is None:
        return dict(ours(n, h, v, variant, dtype, budget_mb), note="lean: no basis row fits")
    e = torch.empty((), dtype=dtype).element_size()
    f = plan.fast_rows
    fv = f * v
    sweeps = 1 + (contexts == 2 and (divergence == "jsd" or clip is not None))
    # forward: cuBLAS writes float32 logits of every context once (resident), the forward fold reads them,
    # the divergence fold (JSD, clip) reads them again, the basis fold reads them and writes the bf16 basis.
    # W is read once per row block: only what a block's GEMM cannot hide under its FLOPs counts as traffic.
    # Backward: dH and dW GEMMs read the basis (operands), write dH and dW.
    block_flops = 2 * (2 if plan.stacked else 1) * plan.rows * h * v
    w_excess = max(0.0, v * h * e - block_flops / (rates[0] * 1e12) * rates[1] * 1e12)
    bytes_ = (contexts * fv * 4 * (2 + sweeps) + fv * e + math.ceil(f / plan.rows) * w_excess
              + f * h * (4 + e) + v * h * e)
    flops = 2 * contexts * f * h * v + 4 * f * h * v
    extra = fv * e + contexts * plan.rows * v * 4 + f * h * 4
    note = f"basis of {f} rows ({fv * e / 2 ** 30:.1f} GiB), blocks of {plan.rows} rows"
    if f < n:
        lean = ours(n - f, h, v, variant, dtype, plan.lean_budget_mb)
        flops, bytes_ = flops + lean["flops"], bytes_ + lean["bytes"]
        extra = fv * e + lean["extra_mb"] * 2 ** 20
        note += f"; {n - f} rows lean"
    return dict(flops=flops, bytes=bytes_, extra_mb=extra / 2 ** 20, note=note)


def _compiled_chunk(n, h, v, contexts, e):
    """(FLOPs, bytes, live bytes) of a compiled plain loss on n rows: bf16 logits written by each context's GEMM
    and read by the fused forward kernel, read again with the teacher's by the fused backward kernel, which
    writes the bf16 dlogits for the dH and dW GEMMs."""
    nv = n * v
    flops = (contexts + 2) * 2 * n * h * v
    bytes_ = contexts * nv * e * 2 + (contexts * nv * e + nv * e) + n * h * 4 + v * h * e
    live = (contexts + 1) * nv * e
    return flops, bytes_, live


def compiled(n, h, v, variant, dtype=torch.bfloat16):
    _, _, contexts = VARIANTS[variant]
    e = torch.empty((), dtype=dtype).element_size()
    flops, bytes_, live = _compiled_chunk(n, h, v, contexts, e)
    return dict(flops=flops, bytes=bytes_, extra_mb=live / 2 ** 20, note="bf16 logits kept for the backward")


def trl(n, h, v, variant, dtype=torch.bfloat16, token_chunk=4096, vocab_chunk=32768):
    divergence, clip, contexts = VARIANTS[variant]
    if clip is not None:
        return dict(status="not available: TRL has no pointwise clip")
    e = torch.empty((), dtype=dtype).element_size()
    nv = n * v
    token_chunks = math.ceil(n / token_chunk)
    vocab_chunks = math.ceil(v / vocab_chunk)
    sweeps = 1 + (divergence == "jsd")
    # forward: per tile one GEMM per context into float32 buffers, a fold reads them
    fwd_bytes = sweeps * contexts * nv * 4 * 2
    # backward: recompute both contexts, fold writes dlogits in place (read + write float32), cast to bf16
    # (read float32, write bf16), the dH/dW GEMMs read it, fp32 dH and dW buffers accumulated by addmm
    bwd_bytes = (contexts * nv * 4 * 2 + nv * 4 * 2 + nv * (4 + e) + 2 * nv * e
                 + vocab_chunks * n * h * 4 * 2 + token_chunks * v * h * 4 * 2 + v * h * (4 + e) + n * h * (4 + e))
    flops = sweeps * 2 * contexts * n * h * v + 2 * contexts * n * h * v + 4 * n * h * v
    rows = min(n, token_chunk)
    extra = (contexts * rows * vocab_chunk * 4 + rows * vocab_chunk * e + v * h * 4 + n * h * 4)
    note = "logprob + entropy (ChunkedLogProbFunction)" if contexts == 1 else "divergence grad only, entropy no grad"
    return dict(flops=flops, bytes=fwd_bytes + bwd_bytes, extra_mb=extra / 2 ** 20, note=note)


def liger(n, h, v, variant, dtype=torch.bfloat16, chunk=1024):
    divergence, clip, contexts = VARIANTS[variant]
    if contexts == 1 or clip is not None or divergence != "jsd":
        return dict(status="not available: Liger's fused distillation loss is the JSD family without a clip")
    e = torch.empty((), dtype=dtype).element_size()
    rows = min(n, chunk)
    chunks = math.ceil(n / chunk)
    flops, bytes_, live = _compiled_chunk(rows, h, v, contexts, e)  # each chunk's compiled loss and gradient
    bytes_ = bytes_ * chunks + chunks * v * h * e * 3  # + bf16 dW accumulation per chunk (read, add, write)
    return dict(flops=flops * chunks, bytes=bytes_, extra_mb=(live + v * h * e) / 2 ** 20,
                note="compiled per 1024-row chunk, gradient in the forward, bf16 dW accumulation")


IMPLS = {"ours": ours, "ours-fast": ours_fast, "eager": eager, "compile": compiled, "trl": trl, "liger": liger}


def predict(n, h, v, variant, matmul_tflops, bandwidth_tbs) -> list:
    rows = []
    floor_ms = floor_flops(n, h, v, variant) / (matmul_tflops * 1e12) * 1e3
    for name, fn in IMPLS.items():
        extra = dict(rates=(matmul_tflops, bandwidth_tbs)) if name == "ours-fast" else {}
        r = dict(impl=name, n=n, h=h, v=v, variant=variant, floor_ms=floor_ms, **fn(n, h, v, variant, **extra))
        if "flops" in r:
            r["ms"] = r["flops"] / (matmul_tflops * 1e12) * 1e3 + r["bytes"] / (bandwidth_tbs * 1e12) * 1e3
            r["roofline_pct"] = 100 * floor_ms / r["ms"]
        rows.append(r)
    return rows


def markdown(rows, matmul_tflops, bandwidth_tbs) -> str:
    lines = [f"Rates: matmul {matmul_tflops:g} TFLOP/s, bandwidth {bandwidth_tbs:g} TB/s.", "",
             "| N | H | V | case | impl | GEMM TFLOP | non-GEMM GB | extra memory (MB) | predicted ms | floor ms | % of roofline | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "flops" not in r:
            lines.append(f"| {r['n']} | {r['h']} | {r['v']} | {r['variant']} | {r['impl']} | | | | | | | {r['status']} |")
            continue
        lines.append(f"| {r['n']} | {r['h']} | {r['v']} | {r['variant']} | {r['impl']} | {r['flops'] / 1e12:.1f} | "
                     f"{r['bytes'] / 1e9:.1f} | {r['extra_mb']:.0f} | {r['ms']:.1f} | {r['floor_ms']:.1f} | "
                     f"{r['roofline_pct']:.0f}% | {r['note']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int)
    p.add_argument("--h", type=int)
    p.add_argument("--v", type=int)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--matmul-tflops", type=float, default=H200["matmul_tflops"])
    p.add_argument("--bandwidth-tbs", type=float, default=H200["bandwidth_tbs"])
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    shapes = [(args.n, args.h, args.v)] if args.n else TARGETS
    rows = [r for n, h, v in shapes for variant in args.variants
            for r in predict(n, h, v, variant, args.matmul_tflops, args.bandwidth_tbs)]
    print(markdown(rows, args.matmul_tflops, args.bandwidth_tbs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(matmul_tflops=args.matmul_tflops, bandwidth_tbs=args.bandwidth_tbs, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
