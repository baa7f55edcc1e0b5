#!/usr/bin/env python3
"""Validate the preference JSONL files in this directory (stdlib only).

Checks, per file:
  * the file is strict UTF-8 and every line is one JSON object;
  * every row has non-empty (not whitespace-only) string "prompt", "chosen", "rejected";
  * every row has an "id" and ids are unique within the file.
Prints the row count of each file. Also prints (without failing) how many rows
have chosen == rejected, and, for rewritten UltraFeedback variants, whether
"source_id" rows agree with ultrafeedback.<source_split>.jsonl where that file exists.

Usage: python3 check.py [DIR]     (exit status 1 if any check fails)
"""

import glob
import json
import os
import sys

__all__ = ["REQUIRED", "check_rows", "load", "main"]

REQUIRED = ("prompt", "chosen", "rejected")


def load(path):
    rows, errors = [], []
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return [], [f"not valid UTF-8: {e}"]
    if text.startswith("\ufeff"):
        errors.append("starts with a byte-order mark")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    else:
        errors.append("last line does not end with a newline")
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"line {n}: invalid JSON ({e})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"line {n}: not a JSON object")
            continue
        obj["__line__"] = n
        rows.append(obj)
    return rows, errors


def check_rows(rows):
    errors, seen = [], set()
    for r in rows:
        n = r.pop("__line__")
        for k in REQUIRED:
            v = r.get(k)
            if not isinstance(v, str) or not v.strip():
                errors.append(f"line {n}: field {k!r} missing, not a string, or empty")
        if "id" not in r:
            errors.append(f"line {n}: no 'id'")
        elif r["id"] in seen:
            errors.append(f"line {n}: duplicate id {r['id']!r}")
        else:
            seen.add(r["id"])
    return errors


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob.glob(os.path.join(d, "*.jsonl")))
    if not paths:
        print("no .jsonl files found")
        return 1
    data, failed, total = {}, False, 0
    for p in paths:
        name = os.path.basename(p)
        rows, errors = load(p)
        errors += check_rows(rows)
        data[name] = rows
        total += len(rows)
        same = sum(1 for r in rows if r.get("chosen") == r.get("rejected"))
        note = f"  (chosen == rejected in {same} row(s))" if same else ""
        print(f"{'FAIL' if errors else 'ok  '} {name:42s} {len(rows):6d} rows{note}")
        for e in errors[:20]:
            print(f"       {e}")
        if len(errors) > 20:
            print(f"       ... {len(errors) - 20} more")
        failed |= bool(errors)
    print(f"total rows: {total} in {len(paths)} files")

    # Cross-check rewritten variants against the original UltraFeedback rows (informational).
    for name, rows in data.items():
        if not rows or "source_id" not in rows[0]:
            continue
        split = rows[0].get("source_split")
        ref = data.get(f"ultrafeedback.{split}.jsonl")
        if ref is None:
            print(f"info {name}: source file ultrafeedback.{split}.jsonl not present; alignment not checked")
            continue
        by_id = {r["id"]: r for r in ref}
        bad = sum(
            1
            for r in rows
            if r["source_id"] not in by_id
            or by_id[r["source_id"]]["prompt"] != r["prompt"]
            or by_id[r["source_id"]]["chosen"] != r.get("original_chosen")
            or by_id[r["source_id"]]["rejected"] != r.get("original_rejected")
        )
        print(f"info {name}: {len(rows) - bad}/{len(rows)} rows match ultrafeedback.{split}.jsonl via source_id")
    print("ALL CHECKS PASSED" if not failed else "SOME CHECKS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
