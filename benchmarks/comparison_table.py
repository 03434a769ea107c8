"""One comparison table from several invocations of ``benchmarks.compare_methods``.

    python -m benchmarks.comparison_table runs/a/comparison.json runs/b/comparison.json --out runs/merged

A comparison too long for one session is completed over several invocations (``--only-seeds``, ``--base-from``):
each writes its own ``comparison.json``. This joins them: the same evaluation settings and base figures in every
file (else nothing is written), each run's seeds gathered across the files (a label's seed may appear once only),
each label's training settings the same in every seed but for the seed and the folders, and the summary (mean and
standard error over the seeds) recomputed. Writes ``<out>/comparison.json`` and ``<out>/comparison.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.compare_methods import summarize, write_table

# per-seed fields that legitimately differ between the seeds of one run
SEED_FIELDS = ("seed", "output_dir", "init_from")


def _settings(record: dict) -> list:
    return [{k: v for k, v in config.items() if k not in SEED_FIELDS} for config in record["configs"]]


def merge(results: list, names: list) -> dict:
    """The joined comparison of ``results`` (parsed comparison.json files, named ``names`` in errors)."""
    first, first_name = results[0], names[0]
    merged = dict(date=max(r["date"] for r in results), device=first["device"], torch=first["torch"],
                  evaluation=first["evaluation"], base=first["base"], runs={},
                  command=[r["command"] for r in results], merged_from=list(names))
    for result, name in zip(results, names):
        for key in ("evaluation", "base"):
            if result.get(key) != first.get(key):
                raise ValueError(f"{name}: its {key} differs from {first_name}'s ({result.get(key)} vs "
                                 f"{first.get(key)}): the runs were not evaluated alike")
        for key in ("device", "torch"):
            if result[key] != first[key]:
                merged[key] = sorted({r[key] for r in results})
        for label, run in result["runs"].items():
            into = merged["runs"].setdefault(label, dict(stages=run["stages"], fields=run["fields"], seeds=[]))
            if (into["stages"], into["fields"]) != (run["stages"], run["fields"]):
                raise ValueError(f"{name}: run {label!r} is {run['stages']} {run['fields']} there but "
                                 f"{into['stages']} {into['fields']} in an earlier file")
            for record in run["seeds"]:
                if any(r["seed"] == record["seed"] for r in into["seeds"]):
                    raise ValueError(f"{name}: run {label!r} seed {record['seed']} appears in two files")
                if into["seeds"] and _settings(record) != _settings(into["seeds"][0]):
                    raise ValueError(f"{name}: run {label!r} seed {record['seed']} was trained with other settings "
                                     f"than its seed {into['seeds'][0]['seed']}")
                into["seeds"].append(dict(record, merged_from=name))
    for run in merged["runs"].values():
        run["seeds"].sort(key=lambda r: r["seed"])
        run["summary"] = summarize(run["seeds"])
    merged["seeds"] = sorted({r["seed"] for run in merged["runs"].values() for r in run["seeds"]})
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.comparison_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparisons", nargs="+", metavar="COMPARISON_JSON")
    p.add_argument("--out", required=True, help="folder for the joined comparison.json and comparison.md")
    args = p.parse_args(argv)
    results = []
    for path in args.comparisons:
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, ValueError) as err:
            raise SystemExit(f"{path}: cannot read a comparison.json ({err})") from None
    try:
        merged = merge(results, args.comparisons)
    except ValueError as err:
        raise SystemExit(f"comparisons: {err}") from None
    except KeyError as err:
        raise SystemExit(f"comparisons: expected comparison.json files, one lacks the field {err}") from None
    merged["command"] = ["python -m benchmarks.comparison_table " + " ".join(
        argv if argv is not None else sys.argv[1:])] + merged["command"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        json.dump(merged, f, indent=2)
    write_table(dict(merged, command=merged["command"][0]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
