"""Run the benchmarks side by side with torch 2.13 and write a report.

Usage: python tests/benchmarks/run.py [--quick] [--only GROUP ...] [--out DIR]

Each bench_*.py module beside this file exposes ``run(quick) -> list[row]``, a row being
{"group", "metric", "unit", "ftimer", "torch", "better": "lower"|"higher", "note"}.
Results go to DIR/results.json and DIR/results.md, and the table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Dict, List, Optional

HERE = pathlib.Path(__file__).parent
MODULES = ["bench_protocol", "bench_client", "bench_server"]

Row = Dict[str, Any]


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _ratio(row: Row) -> Optional[float]:
    ftimer, torch = row.get("ftimer"), row.get("torch")
    if not ftimer or not torch:
        return None
    # Always "how many times better ftimer is": > 1 means ftimer ahead.
    return torch / ftimer if row["better"] == "lower" else ftimer / torch


def markdown(rows: List[Row], meta: Dict[str, Any]) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}, "
        f"torch {meta['torch']}, {'quick' if meta['quick'] else 'full'} run.",
        "",
        "| group | metric | ftimer | torch 2.13 | ftimer advantage | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        ratio = _ratio(row)
        lines.append(
            f"| {row['group']} | {row['metric']} | {_fmt(row.get('ftimer'))} "
            f"| {_fmt(row.get('torch'))} | {'-' if ratio is None else f'{ratio:.1f}x'} "
            f"| {row.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for development")
    parser.add_argument("--only", nargs="*", default=None, help="module names to run")
    parser.add_argument("--out", default="bench-results", help="output directory")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "not installed"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch_version,
        "quick": args.quick,
    }
    rows: List[Row] = []
    for name in args.only or MODULES:
        if not (HERE / f"{name}.py").exists():
            print(f"(skipping {name}: not written yet)", file=sys.stderr)
            continue
        start = time.monotonic()
        rows += importlib.import_module(name).run(args.quick)
        print(f"{name}: {time.monotonic() - start:.1f} s", file=sys.stderr)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = markdown(rows, meta)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
