"""How sparse is the op's gradient? The share of gradient tiles whose entries are all tiny (issue 25, item 6).

    python -m benchmarks.gradient_sparsity [--problems 16 --generations 4 --threshold-log2 -12]

Cut Cross-Entropy skips the gradient tiles (rows x vocabulary columns) in which every softmax entry is below
2^-12, the bfloat16 precision of a sum of order 1. This measures what such filtering could skip here, on the
embedded model's own rollouts (OPSD's student and teacher contexts, the rows a distillation step gets): for each
tile shape, the share of tiles whose every entry of the gradient w.r.t. the logits is below the threshold in
magnitude, for the two gradients the op forms per token with a unit upstream gradient:

- ``logp`` (GRPO, SFT): ``onehot(y) - q``;
- ``forward_kl`` (distillation, teacher p, student q): ``q - p``.

The threshold applies before the token-mean's 1/N, as CCE applies it to the softmax itself. Also printed: the
share of single entries below the threshold (the bound no tiling can beat) and the largest gradient mass a
filter would drop per row (the sum of the skipped entries' magnitudes, its error bound).
"""
from __future__ import annotations

import argparse
import sys
import time

TILES = ((16, 256), (64, 256), (128, 128), (128, 256), (256, 1024))


def tile_shares(grad, threshold: float, tiles=TILES) -> dict:
    """Per tile shape 'RxC': the share of tiles of ``grad`` [N, V] whose entries are all below ``threshold``
    (edge tiles count as tiles), and the largest per-row sum of |grad| over the skipped tiles."""
    import torch.nn.functional as F

    small = grad.abs() < threshold
    out = {}
    for rows, cols in tiles:
        n, v = grad.shape
        pad_n, pad_v = -n % rows, -v % cols
        # a padded entry counts as small, so an edge tile is judged on its real entries only
        padded = F.pad(small, (0, pad_v, 0, pad_n), value=True)
        tiles_small = padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols).all(3).all(1)
        skipped = tiles_small.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:n, :v]
        dropped = (grad.abs() * skipped).sum(1).max()
        out[f"{rows}x{cols}"] = dict(share=float(tiles_small.float().mean()), max_row_dropped=float(dropped))
    return out


def measure(args) -> dict:
    import torch

    from benchmarks.teacher_signal import head_log_probs
    from benchmarks.topk_teacher import opsd_rollout_rows

    student, teacher, head, rollouts, targets = opsd_rollout_rows(args)
    threshold = 2.0 ** args.threshold_log2
    result = dict(rollouts=rollouts, tokens=int(student.shape[0]), vocab=int(head.weight.shape[0]),
                  threshold=threshold, gradients={})
    with torch.no_grad():
        # the model's own probabilities through the whole head (bias, softcap), in float64 as recorded
        q = head_log_probs(head, student, torch.float64).exp()
        p = head_log_probs(head, teacher, torch.float64).exp()
        grads = {"logp": -q.scatter_add(1, targets.unsqueeze(1), -torch.ones_like(q[:, :1])),
                 "forward_kl": q - p}
        for name, grad in grads.items():
            entries = float((grad.abs() < threshold).double().mean())
            result["gradients"][name] = dict(entries_below=entries, tiles=tile_shares(grad, threshold))
            shares = " ".join(f"{t}={v['share']:.3f}" for t, v in result["gradients"][name]["tiles"].items())
            print(f"{name}: entries below 2^{args.threshold_log2}: {entries:.4f}; all-small tiles: {shares}",
                  flush=True)
    return result


def main(argv=None) -> int:
    from benchmarks.measure import save_run
    from benchmarks.topk_teacher import rollout_arguments

    p = argparse.ArgumentParser(prog="python -m benchmarks.gradient_sparsity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threshold-log2", type=int, default=-12)
    rollout_arguments(p)
    args = p.parse_args(argv)
    started = time.time()
    save_run(measure(args), "benchmarks.gradient_sparsity", argv, started, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
