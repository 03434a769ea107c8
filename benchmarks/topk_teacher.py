"""A teacher given as top-k log-probs against the full-vocabulary teacher: cost, and what the top-k changes.

    python -m benchmarks.topk_teacher cost [--n 2048 --h 576 --v 49152 --ks 20 100]
    python -m benchmarks.topk_teacher gap  [--problems 8 --generations 4 --ks 20 100]

``cost``: forward + backward of the forward-KL distillation loss (token mean) at one shape, float32, on this
machine: the full teacher (``teacher_hidden``, two contexts sharing the head) against a top-k teacher
(``teacher_topk_ids``/``teacher_topk_logprobs``, one context) for each k, with and without the tail bucket.
Each variant runs in a fresh process: time is the median of 3 steps after a warm-up; extra memory is the peak
RSS of those steps above the RSS once the inputs, gradients and the warm-up's buffers exist (the teacher's top-k
tensors count as inputs: a server or a cache hands them over).

``gap``: the embedded model's own rollouts on the arithmetic task (OPSD's teacher context: the reference solution)
scored against the full teacher and against its top-k (+ tail), per token: the mean forward KL of each, their
ratio, the share of the teacher's mass its top-k holds, and the correlation between the per-token values.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from pydistill.models import EMBEDDED_DEFAULT


def _variant(name: str, n: int, h: int, v: int, seed: int = 0):
    """(step function, inputs) of one variant: ``full``, ``topk<k>`` or ``topk<k>-renorm``."""
    import torch

    from pydistill.losses import distillation_loss

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).requires_grad_()
    teacher = torch.randn(1, n, h, generator=g)
    if name == "full":
        def step():
            distillation_loss(hidden, weight, teacher, divergence="forward_kl").loss.backward()
        return step
    k = int(name[4:].split("-")[0])
    with torch.no_grad():  # the teacher's top-k, as a server would send it (one [N, V] product, outside the timing)
        logprobs, ids = torch.log_softmax(teacher[0] @ weight.t(), -1).topk(k, dim=-1)
    ids, logprobs = ids.unsqueeze(0), logprobs.unsqueeze(0)
    tail = not name.endswith("-renorm")

    def step():
        distillation_loss(hidden, weight, None, divergence="forward_kl", teacher_topk_ids=ids,
                          teacher_topk_logprobs=logprobs, topk_tail=tail).loss.backward()
    return step


def measure_one(name: str, n: int, h: int, v: int, repeats: int = 3) -> dict:
    from benchmarks.measure import peak_rss_mb, reset_peak_rss, rss_mb, versions

    step = _variant(name, n, h, v)
    step()  # warm-up: gradients and one-time buffers exist from here on
    base = rss_mb()
    reset_peak_rss()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return dict(variant=name, n=n, h=h, v=v, dtype="float32", seconds=statistics.median(times),
                extra_mb=max(peak_rss_mb() - base, 0.0), **versions())


def cost(args) -> list:
    names = ["full"] + [f"topk{k}" for k in args.ks] + [f"topk{k}-renorm" for k in args.ks]
    records = []
    for name in names:
        done = subprocess.run([sys.executable, "-m", "benchmarks.topk_teacher", "one", name, "--n", str(args.n),
                               "--h", str(args.h), "--v", str(args.v)], capture_output=True, text=True,
                              env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
        if done.returncode != 0:
            raise SystemExit(f"variant {name} failed: {done.stderr.strip().splitlines()[-1:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = records[-1]
        print(f"{name:14s} {r['seconds'] * 1e3:9.1f} ms  {r['extra_mb']:8.1f} MB  "
              f"({r['seconds'] / records[0]['seconds']:.2f}x time, "
              f"{r['extra_mb'] / max(records[0]['extra_mb'], 1e-9):.2f}x memory of the full teacher)", flush=True)
    return records


def opsd_rollout_rows(args):
    """(student rows [N, H], teacher rows [N, H], the model's head, rollouts, targets [N]) of the embedded model's
    own rollouts on the arithmetic task, scored under the student prompt and under OPSD's teacher context (the
    reference solution): the rows a distillation step on them would hand to the op. The head is the model's
    ``read_head`` (weight, bias times the logit scale, softcap); the rows are in the op's input space."""
    import torch

    from benchmarks.teacher_signal import hidden_rows
    from pydistill.boundary import read_head
    from pydistill.evaluation import generate_completions
    from pydistill.models import load_model
    from pydistill.prompts import opsd_teacher_messages, render, student_messages
    from pydistill.tasks import get_task

    model, tokenizer = load_model(args.model)
    model.eval()
    task = get_task("arithmetic")
    problems = task.problems(args.split, n=args.problems, seed=args.seed)
    prompts = [render(tokenizer, student_messages(p.question)) for p in problems for _ in range(args.generations)]
    torch.manual_seed(args.seed)
    _, completions = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                          greedy=False, temperature=args.temperature, batch_size=32)
    repeated = [p for p in problems for _ in range(args.generations)]
    keep = [i for i, c in enumerate(completions) if c]
    completions = [completions[i] for i in keep]
    student_ids = [tokenizer(prompts[i], add_special_tokens=False)["input_ids"] for i in keep]
    teacher_ids = [tokenizer(render(tokenizer, opsd_teacher_messages(repeated[i].question, repeated[i].solution)),
                             add_special_tokens=False)["input_ids"] for i in keep]
    head = read_head(model)  # read once, for both contexts' rows and every scoring
    student = torch.cat(hidden_rows(model, tokenizer, student_ids, completions, head=head))
    teacher = torch.cat(hidden_rows(model, tokenizer, teacher_ids, completions, head=head))
    targets = torch.tensor([t for c in completions for t in c], dtype=torch.long)
    return student, teacher, head, len(keep), targets


def topk_gap(student, teacher, head, ks) -> dict:
    """Per-token forward KL of ``student`` rows [N, H] to the full teacher (``teacher`` rows [N, H], the same
    model) and to its top-k for each k (with the tail bucket and renormalized), all through the whole ``head``
    (its bias and softcap too): the means, their ratio, the top-k's share of the teacher's mass, and the
    per-token correlation."""
    import torch

    from benchmarks.teacher_signal import head_log_probs
    from pydistill.token_stats import token_stats

    weight, scoring = head.weight.detach(), dict(bias=head.bias, softcap=head.softcap)
    with torch.no_grad():
        full = token_stats(student, weight, teacher_hidden=teacher, divergence="forward_kl", **scoring).divergence
        result = dict(tokens=int(full.numel()), full_forward_kl=float(full.mean()), ks={})
        teacher_logprobs = head_log_probs(head, teacher)
        for k in ks:
            logprobs, ids = teacher_logprobs.topk(k, dim=-1)
            row = dict(teacher_mass=float(logprobs.exp().sum(-1).mean()))
            for tail in (True, False):
                topk = token_stats(student, weight, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                   divergence="forward_kl", topk_tail=tail, **scoring).divergence
                name = "tail" if tail else "renormalized"
                row[f"{name}_forward_kl"] = float(topk.mean())
                row[f"{name}_ratio_to_full"] = float(topk.mean() / full.mean())
                row[f"{name}_pearson_r"] = float(torch.corrcoef(torch.stack([topk, full]))[0, 1])
            result["ks"][k] = row
            print(f"k={k}: " + " ".join(f"{name}={value:.4f}" for name, value in row.items()), flush=True)
    return result


def gap(args) -> dict:
    student, teacher, head, rollouts, _ = opsd_rollout_rows(args)
    result = dict(rollouts=rollouts, **topk_gap(student, teacher, head, args.ks))
    print(f"full-vocabulary forward KL {result['full_forward_kl']:.4f} over {result['tokens']} tokens")
    return result


def rollout_arguments(p) -> None:
    """The options of :func:`opsd_rollout_rows` (and ``--out``)."""
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)


def main(argv=None) -> int:
    from benchmarks.measure import save_run

    p = argparse.ArgumentParser(prog="python -m benchmarks.topk_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["cost", "gap", "one"])
    p.add_argument("variant", nargs="?", help="(one) the variant to time in this process")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--h", type=int, default=576)
    p.add_argument("--v", type=int, default=49152)
    p.add_argument("--ks", type=int, nargs="+", default=[20, 100])
    rollout_arguments(p)
    args = p.parse_args(argv)
    if args.part == "one":
        print(json.dumps(measure_one(args.variant, args.n, args.h, args.v)))
        return 0
    started = time.time()
    result = dict(part=args.part, records=cost(args)) if args.part == "cost" else dict(part="gap", **gap(args))
    save_run(result, "benchmarks.topk_teacher", argv, started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
