"""The demo's closing table: zero-shot, each merge and the fine-tuned models on the test splits, side by side.

Run as ``.venv/bin/python demo/report.py OUTPUT...`` on outputs of recipes with an `evaluation:` section; every
number is read from their hubmerge.json, where `hubmerge run` recorded it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main(outputs: list[Path]) -> None:
    records = [json.loads((out / "hubmerge.json").read_text()) for out in outputs]
    first = records[0]["evaluation"]
    tasks = list(first["datasets"])
    rows = {"zero-shot": first["rows"]["zero-shot"]}
    notes = []
    for record in records:
        rows[record["method"]] = record["evaluation"]["rows"][record["method"]]
        chosen = record.get("search", {}).get("chosen", {})
        setting = ", ".join(f"{k} = {json.dumps(v)}" for k, v in chosen.items())
        storage = record.get("storage")
        size = (
            f"; stores {storage['artifact_bits'] / storage['finetuned_fp32_bits']:.3f}× of T fine-tuned copies"
            if storage
            else ""
        )
        notes.append(f"{record['method']}: {setting or 'recipe values'}{size}")
    rows["fine-tuned"] = first["rows"]["fine-tuned"]

    table = Table(title=f"{first['metric']} on the {first['split']} splits (%), each task with its own head")
    for column in ("model", *tasks, "mean", "normalized"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, row in rows.items():
        table.add_row(
            name,
            *(f"{100 * row['accuracy'][t]:.1f}" for t in tasks),
            f"{100 * row['mean_accuracy']:.1f}",
            f"{100 * row['mean_normalized']:.1f}",
        )
    console = Console(width=120)
    console.print(table)
    for note in notes:
        console.print(f"chosen on validation, {note}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: demo/report.py OUTPUT [OUTPUT ...]")
    main([Path(arg) for arg in sys.argv[1:]])
