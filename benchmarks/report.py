"""Markdown tables, ratios and plots from the benchmark JSON, and the README results section.

    python -m benchmarks.report benchmarks/results/results.json          # re-render results.md / .png
    python -m benchmarks.report --readme cpu/results.json trainer/results.json [--readme-path README.md]

``--readme`` replaces the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in the README
(appending the markers at the end when the README has none) with one subsection per JSON file: its device,
versions, date and command, the tables, the ratios and the plots, each captioned with its device and date.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

START, END = "<!-- results:start -->", "<!-- results:end -->"


# ----- helpers -------------------------------------------------------------------------------------------
def _ok(r) -> bool:
    return r.get("status") == "ok"


def _config(r) -> tuple:
    return r.get("shape", ""), r["n"], r["h"], r["v"], r["dtype"]


def _index(records) -> dict:
    return {(r["case"],) + _config(r): r for r in records}


def _rate_unit(results) -> tuple:
    """(label, divisor from GFLOP/s): TFLOP/s on CUDA, GFLOP/s elsewhere."""
    return ("TFLOP/s", 1e3) if results.get("device") == "cuda" else ("GFLOP/s", 1.0)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if b and b > 0 else "n/a"


def _mem_share(extra, base) -> str:
    # RSS deltas of a few MB are noise: no percentage of a near-zero baseline
    return f"{100 * max(extra, 0.0) / base:.1f}%" if base and base > 1.0 else "n/a"


def header(results) -> str:
    cap = f"; memory cap {results['cap_gb']} GiB per process" if results.get("cap_gb") else ""
    return (f"Device: **{results.get('device_name', '?')}**; torch {results.get('torch')}, triton "
            f"{results.get('triton')}, liger-kernel {results.get('liger_kernel')}, cut-cross-entropy "
            f"{results.get('cce')}; date {results.get('date')}{cap}.  \nCommand: `{results.get('command')}`")


# ----- op sweep ------------------------------------------------------------------------------------------
def ops_table(results) -> str:
    unit, div = _rate_unit(results)
    lines = [f"| case | shape | N | H | V | dtype | time (ms) | extra memory (MB) | FLOPs basis | achieved {unit} "
             f"| matmul {unit} | % of matmul | status |", "|" + "---|" * 13]
    for r in results["records"]:
        basis = f"{6 * (2 if r.get('family') in ('core', 'distill', 'mask') else 1)}NHV"
        if r.get("family") == "mask":
            basis += f" x {1 - int(r['case'][4:r['case'].index('-')]) / 100:.2f}"
        cells = [r["case"], r.get("shape", ""), r["n"], r["h"], r["v"], r["dtype"]]
        if _ok(r):
            cells += [f"{r['ms']:.1f}", f"{r['extra_mb']:.0f}", basis, f"{r['gflops'] / div:.3g}",
                      f"{r['matmul_gflops'] / div:.3g}", f"{100 * r['gflops'] / r['matmul_gflops']:.0f}%", "ok"]
        else:
            cells += ["", "", basis, "", "", "", r.get("status", "?")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def ratio_table(records) -> str:
    """Every non-eager case against its eager baseline, and ours against the third-party rival."""
    index = _index(records)
    lines = ["| case | vs | shape | N | dtype | time ratio | extra memory (share of the other's) |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        if not _ok(r):
            continue
        for other_name in (r.get("baseline"), r.get("rival")):
            if not other_name:
                continue
            other = index.get((other_name,) + _config(r))
            if other is None:
                continue
            cells = [r["case"], other_name, r.get("shape", ""), r["n"], r["dtype"]]
            if _ok(other):
                cells += [_ratio(r["ms"], other["ms"]), _mem_share(r["extra_mb"], other["extra_mb"])]
            else:
                cells += [f"{other_name}: {other['status']}", ""]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def mask_table(records) -> str:
    """First-error masking: time of p% masked rows against the same backend unmasked, and the ideal 1 - p."""
    index = _index(records)
    lines = ["| case | shape | N | dtype | masked rows | time vs unmasked | ideal | extra memory (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("family") != "mask" or not _ok(r):
            continue
        share = int(r["case"][4:r["case"].index("-")])
        unmasked = index.get((f"mask0-{r['impl']}",) + _config(r))
        if unmasked is None or not _ok(unmasked):
            continue
        lines.append(f"| {r['case']} | {r.get('shape', '')} | {r['n']} | {r['dtype']} | {share}% | "
                     f"{_ratio(r['ms'], unmasked['ms'])} | {1 - share / 100:.2f}x | {r['extra_mb']:.0f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


# ----- trainer step ------------------------------------------------------------------------------------------
def trainer_table(results) -> str:
    lines = ["| loss | batch (rollouts) | tokens | step (s) | tokens/s | peak memory (MB) "
             "| extra over model and optimizer states (MB) | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        if _ok(r):
            lines.append(f"| {r['loss']} | {r['batch']} | {r['tokens']} | {r['step_s']:.2f} | "
                         f"{r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} | ok |")
        else:
            lines.append(f"| {r['loss']} | {r['batch']} | {r.get('tokens', '')} | | | | | {r['status']} |")
    fits = largest_batches(results["records"])
    cap, stops = results.get("cap_gb"), results.get("stops", {})
    summary = []
    for loss, (b, t) in fits.items():
        stop = stops.get(loss, "")
        bound = "" if stop.startswith("OOM") else " (at least: the sweep stopped before any OOM)"
        summary.append(f"- largest batch that fits{f' under {cap} GiB' if cap else ''}, {loss} loss: "
                       + (f"{b} rollouts ({t} tokens){bound}" if b else "none")
                       + (f"; stopped: {stop}" if stop else ""))
    tps = {}
    for r in results["records"]:
        if _ok(r):
            tps.setdefault(r["batch"], {})[r["loss"]] = r["tokens_per_s"]
    for batch, by_loss in sorted(tps.items()):
        if "fused" in by_loss and "eager" in by_loss:
            summary.append(f"- batch {batch}: fused {_ratio(by_loss['fused'], by_loss['eager'])} the eager "
                           f"loss's tokens/s")
    return "\n".join(lines + [""] + summary)


def largest_batches(records) -> "OrderedDict[str, tuple]":
    out = OrderedDict()
    for r in records:
        best = out.get(r["loss"], (0, 0))
        if _ok(r) and r["batch"] > best[0]:
            best = (r["batch"], r["tokens"])
        out[r["loss"]] = best
    return out


# ----- documents ------------------------------------------------------------------------------------------------
def render_markdown(results, images=()) -> str:
    parts = [header(results), ""]
    if results.get("kind") == "trainer":
        model = results.get("model", {})
        parts += [f"OPSD trainer step, fixed rollout (no generation): model {model.get('name')} "
                  f"({model.get('layers')} layers, H={model.get('hidden')}, V={model.get('vocab')}), "
                  f"completion {results.get('completion_len')} tokens, divergence {results.get('divergence')} "
                  f"clip {results.get('clip')}; fused loss vs eager full-logits loss of the same objective.", "",
                  trainer_table(results)]
    else:
        parts += [ops_table(results)]
        ratios, masks = ratio_table(results["records"]), mask_table(results["records"])
        if ratios:
            parts += ["", "Ratios (time: this case's / the other's; memory: this case's extra memory as a share "
                          "of the other's):", "", ratios]
        if masks:
            parts += ["", "First-error masking:", "", masks]
    for path in images:
        parts += ["", f"![{os.path.basename(path)}]({path})", "",
                  f"*{results.get('device_name')}, {results.get('date')}*"]
    return "\n".join(parts) + "\n"


def _bar_panels(records, axes, title):
    labels = [r["case"] for r in records]
    ys = range(len(records))
    for ax, key, xlabel in ((axes[0], "ms", "fwd+bwd time (ms)"), (axes[1], "extra_mb", "extra peak memory (MB)")):
        values = [max(r[key], 1e-3) if _ok(r) else 0.0 for r in records]
        ax.barh(list(ys), values, color=["C0" if _ok(r) else "none" for r in records])
        for y, r in zip(ys, records):
            if not _ok(r):
                ax.text(0.01, y, r["status"][:40], va="center", fontsize=6, color="C3",
                        transform=ax.get_yaxis_transform())
        ax.set_yticks(list(ys))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        positive = [x for x in values if x > 0]
        if positive and max(positive) / min(positive) > 30:  # log only when the values span decades
            ax.set_xscale("log")
        ax.set_title(title, fontsize=8)


def plot(results, path) -> list:
    """One PNG per (shape, N, dtype) configuration (the first at ``path``); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results.get("kind") == "trainer":
        return [plot_trainer(results, path)]
    groups = OrderedDict()
    for r in results["records"]:
        groups.setdefault(_config(r), []).append(r)
    if not groups:
        groups[("", 0, 0, 0, "")] = []
    paths = []
    stem, ext = os.path.splitext(path)
    for i, (config, records) in enumerate(groups.items()):
        shape, n, h, v, dtype = config
        fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.2 * max(len(records), 1)))
        _bar_panels(records, axes, f"{shape} N={n} H={h} V={v} {dtype}")
        fig.suptitle(f"{results.get('device_name')}, {results.get('date')}", fontsize=8)
        fig.tight_layout()
        out = path if i == 0 else f"{stem}-{shape}-{n}-{dtype}{ext}"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        paths.append(out)
    return paths


def plot_trainer(results, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for loss in largest_batches(results["records"]):
        ok = [r for r in results["records"] if r["loss"] == loss and _ok(r)]
        axes[0].plot([r["batch"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=loss)
        axes[1].plot([r["batch"] for r in ok], [r["peak_mb"] for r in ok], "o-", label=loss)
        for r in results["records"]:
            if r["loss"] == loss and not _ok(r):
                axes[1].axvline(r["batch"], ls=":", color="C3")
                axes[1].text(r["batch"], 0.95, f"{loss} {r['status'][:12]}", rotation=90, va="top", fontsize=7,
                             transform=axes[1].get_xaxis_transform())
    if results.get("cap_gb"):
        kind = "memory cap" if results.get("device") == "cuda" else "address-space cap (RLIMIT_AS)"
        axes[1].axhline(results["cap_gb"] * 1024, ls="--", color="gray", label=kind)
    for ax, label in ((axes[0], "tokens / s"), (axes[1], "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rollouts)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"OPSD trainer step, {results.get('device_name')}, {results.get('date')}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results, out_dir) -> dict:
    """results.json, results.md and the PNG(s) in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = dict(json=os.path.join(out_dir, "results.json"), md=os.path.join(out_dir, "results.md"),
                 png=os.path.join(out_dir, "results.png"))
    results["images"] = [os.path.basename(p) for p in plot(results, paths["png"])]
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(render_markdown(results, results["images"]))
    return paths


def readme_section(json_paths, readme_dir=".") -> str:
    """The generated README results section (without the markers) from one or more results.json files."""
    parts = ["_Generated by `python -m benchmarks.report --readme " + " ".join(json_paths)
             + "` from the recorded runs; every figure names its device and date._"]
    for path in json_paths:
        with open(path) as f:
            results = json.load(f)
        folder = os.path.dirname(os.path.abspath(path))
        images = [os.path.relpath(os.path.join(folder, name), os.path.abspath(readme_dir))
                  for name in results.get("images", []) if os.path.exists(os.path.join(folder, name))]
        what = "OPSD trainer step" if results.get("kind") == "trainer" else "Fused op and losses"
        parts += ["", f"### {what} — {results.get('device_name')}, {results.get('date')}", "",
                  render_markdown(results, images).rstrip()]
    return "\n".join(parts) + "\n"


def update_readme(readme_path, json_paths) -> str:
    """Replace the text between the results markers of ``readme_path``; returns the new README text."""
    with open(readme_path) as f:
        text = f.read()
    section = readme_section(json_paths, os.path.dirname(os.path.abspath(readme_path)))
    block = f"{START}\n{section}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        if END not in rest:
            raise ValueError(f"{readme_path}: {END} must follow {START}")
        text = head + block + rest.split(END, 1)[1]
    elif START in text or END in text:
        raise ValueError(f"{readme_path} has only one of the markers {START} / {END}")
    else:
        text = text.rstrip("\n") + "\n\n## Benchmark results\n\n" + block + "\n"
    with open(readme_path, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.report")
    p.add_argument("json", nargs="*", help="results.json files to re-render (results.md and PNGs beside them)")
    p.add_argument("--readme", nargs="+", metavar="RESULTS_JSON",
                   help="write the README results section from these results.json files")
    p.add_argument("--readme-path", default="README.md")
    args = p.parse_args(argv)
    if not args.json and not args.readme:
        p.error("give results.json files, or --readme RESULTS_JSON ...")
    for path in args.json:
        with open(path) as f:
            results = json.load(f)
        written = write_outputs(results, os.path.dirname(os.path.abspath(path)))
        print(f"re-rendered {written['md']}")
    if args.readme:
        update_readme(args.readme_path, args.readme)
        print(f"updated the results section of {args.readme_path} from {', '.join(args.readme)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
