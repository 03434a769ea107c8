"""Markdown table and plot from the sweep's JSON records."""
from __future__ import annotations


def markdown_table(records: list, date: str, command: str) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    head = records[0] if records else {}
    lines = [f"Device: {head.get('device', '?')}; torch {head.get('torch')}, triton {head.get('triton')}; "
             f"date {date}; command: `{command}`", "",
             "| case | N | H | V | dtype | time (ms) | extra peak memory (MB) | GFLOP/s (12NHV) | matmul GFLOP/s | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") == "ok":
            lines.append(f"| {r['case']} | {r['n']} | {r['h']} | {r['v']} | {r['dtype']} | {r['ms']:.0f} | "
                         f"{r['extra_mb']:.0f} | {r['gflops']:.1f} | {r['matmul_gflops']:.1f} | ok |")
        else:
            lines.append(f"| {r['case']} | {r['n']} | {r['h']} | {r['v']} | {r['dtype']} | | | | | {r['status']} |")
    by_case = {(r["case"], r["n"], r["v"], r["dtype"]): r for r in ok}
    ratios = []
    for (case, n, v, dtype), r in by_case.items():
        eager = by_case.get(("core-eager", n, v, dtype))
        if eager and case != "core-eager" and case.startswith("core-"):
            ratios.append(f"- {case} vs eager ({dtype}, N={n}, V={v}): time {r['ms'] / eager['ms']:.2f}x, "
                          f"extra memory {100 * r['extra_mb'] / max(eager['extra_mb'], 1e-9):.1f}% of eager")
        base = by_case.get(("mask0-chunked", n, v, dtype))
        if base and case.startswith("mask") and case.endswith("-chunked") and case != "mask0-chunked":
            ratios.append(f"- {case} vs unmasked ({dtype}): time {r['ms'] / base['ms']:.2f}x")
    return "\n".join(lines + [""] + sorted(ratios)) + "\n"


def plot(records: list, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    labels = [f"{r['case']}\n{r['dtype']} N={r['n']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(ok)), 4))
    axes[0].bar(labels, [r["ms"] for r in ok])
    axes[0].set_ylabel("fwd+bwd time (ms)")
    axes[1].bar(labels, [r["extra_mb"] for r in ok])
    axes[1].set_ylabel("extra peak memory (MB)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
