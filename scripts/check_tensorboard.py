#!/usr/bin/env python3
"""Reads a run's TensorBoard event files back with TensorBoard's own EventAccumulator and checks
them against the run's metrics.jsonl: every numeric field of every line is a scalar at that step
(`levels` as levels_0, levels_1, ...; a remote pool's `pool/<i>/<name>` and a judge panel's
`judge/<member>/<name>` as that very tag), equal
to the JSON value rounded to f32 (TensorBoard's simple_value), with the line's timestamp as wall
time; nothing more, and no step twice.

Orphan purging is off, so a step left behind by a resume would show up as a repeated or
out-of-order step instead of being hidden by TensorBoard.

Usage (with the set-up venv, which has tensorboard):
    ~/.cache/orchestrator/venv/bin/python scripts/check_tensorboard.py RUN_DIR
Prints one `ok:` line and exits 0, or lists the differences and exits 1.
"""
import json
import os
import struct
import sys

from tensorboard.backend.event_processing import event_accumulator as ea


def f32(x):
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def expected(run_dir):
    """{field: {step: (value, timestamp)}} from the complete lines of metrics.jsonl."""
    want = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        text = f.read()
    complete = text[: text.rfind("\n") + 1]
    for n, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        v = json.loads(line)
        step, ts = v["step"], v.get("timestamp")
        for k, x in v.items():
            if k in ("step", "timestamp"):
                continue
            if isinstance(x, bool) or x is None or isinstance(x, str):
                continue
            if isinstance(x, (int, float)):
                want.setdefault(k, {})[step] = (x, ts)
            elif isinstance(x, list):
                for i, y in enumerate(x):
                    if isinstance(y, (int, float)) and not isinstance(y, bool):
                        want.setdefault(f"{k}_{i}", {})[step] = (y, ts)
    return want


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    run_dir = sys.argv[1]
    files = sorted(f for f in os.listdir(run_dir) if "tfevents" in f)
    acc = ea.EventAccumulator(run_dir, size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    want = expected(run_dir)
    problems = []
    got_fields = {}
    for tag in tags:
        group, _, field = tag.partition("/")
        if group == "pool" or (group == "judge" and "/" in field):
            # A remote pool's per-server keys (pool/<i>/<name>) and a judge panel's per-member
            # keys (judge/<member>/<name>) are their own tags.
            field = tag
        if not field or not group:
            problems.append(f"tag {tag!r} is not group/field")
            continue
        if field in got_fields:
            problems.append(f"field {field} under two tags: {got_fields[field]} and {tag}")
        got_fields[field] = tag
    for field in sorted(set(want) - set(got_fields)):
        problems.append(f"{field}: in metrics.jsonl, not in the events")
    for field in sorted(set(got_fields) - set(want)):
        problems.append(f"{got_fields[field]}: in the events, not in metrics.jsonl")
    scalars = 0
    for field, tag in sorted(got_fields.items()):
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        if steps != sorted(set(steps)):
            problems.append(f"{tag}: steps repeated or out of order: {steps}")
        w = want.get(field, {})
        if set(steps) != set(w):
            problems.append(f"{tag}: steps {sorted(set(steps))} != metrics steps {sorted(w)}")
        for e in events:
            if e.step not in w:
                continue
            x, ts = w[e.step]
            if e.value != f32(x):
                problems.append(f"{tag} step {e.step}: {e.value!r} != f32({x!r}) = {f32(x)!r}")
            if ts is not None and e.wall_time != ts:
                problems.append(f"{tag} step {e.step}: wall time {e.wall_time!r} != timestamp {ts!r}")
            scalars += 1
    if problems:
        print(f"{len(problems)} problem(s) in {run_dir} ({len(files)} event file(s)):")
        for p in problems[:50]:
            print("  " + p)
        return 1
    steps = sorted({s for w in want.values() for s in w})
    print(
        f"ok: {len(files)} event file(s), {len(steps)} steps ({steps[0] if steps else '-'}..{steps[-1] if steps else '-'}), "
        f"{len(got_fields)} tags, {scalars} scalars equal metrics.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
