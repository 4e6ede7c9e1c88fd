"""BENCHMARKS.md: each benchmark owns one section, replaced in place on every run (others are kept)."""

from __future__ import annotations

import datetime
import json
import os
import platform

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("# ConceptGate benchmarks\n\nEvery number here was measured by `python -m conceptgate bench ...`; "
          "each section says when, on what, and with which command. Failures are reported as measured.\n")


def machine() -> str:
    threads = torch.get_num_threads()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    load = ", load average %.1f at write time" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores ({threads} torch threads), {dev}, "
            f"torch {torch.__version__}{load}")


def write_section(key: str, title: str, body: str, command: str, path: str | None = None, data: dict | None = None,
                  json_path: str | None = None, measured: dict | None = None, first: bool = False) -> str:
    """``measured``: the ``measured`` / ``machine`` of an earlier run when a section is re-rendered from its stored
    figures (the text then says when and where they were measured, not when they were written again).
    ``first``: a summary of other sections' figures (the headline): placed first, and said to be rendered, not measured."""
    # CONCEPTGATE_BENCHMARKS redirects every section (tests run the real benchmarks without touching the repo's file)
    path = path or os.environ.get("CONCEPTGATE_BENCHMARKS") or os.path.join(ROOT, "BENCHMARKS.md")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = machine()
    if measured:
        stamp, where = measured["measured"], measured["machine"]
    said = f"Rendered {stamp} from benchmarks.json (no generation)" if first else f"Measured {stamp} on {where}"
    block = (f"<!-- bench:{key}:start -->\n## {title}\n\n_{said}; "
             f"command: `{command}`._\n\n{body.strip()}\n<!-- bench:{key}:end -->\n")
    text = open(path).read() if os.path.exists(path) else HEADER
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) + 1:]
    elif first and "<!-- bench:" in text:
        at = text.index("<!-- bench:")
        text = text[:at] + block + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(text)
    if json_path and data is not None:
        existing = json.load(open(json_path)) if os.path.exists(json_path) else {}
        existing[key] = {**data, "measured": stamp, "machine": where}
        with open(json_path, "w") as f:
            json.dump(existing, f, indent=2, default=float)
    return path


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(r.get(c[0], "")) for c in columns) + " |\n" for r in rows)
