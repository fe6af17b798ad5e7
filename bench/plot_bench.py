#!/usr/bin/env python3
"""Plot zo2-bench rows: tokens/s against the device-memory cap, one panel per model.

    python3 bench/plot_bench.py RESULTS.jsonl OUT.png [--title TEXT]

Reads zo2-bench's JSONL (`zo2-bench --jsonl FILE`; `zo2-bench --plot OUT.png` runs this
script itself). Each line of a panel is one (storage dtype, compute dtype, B x T, offload,
device) series over the caps; "none" (the whole device) is drawn right of the largest cap.
Filled markers: every block resident; open markers: some blocks streamed. When the rows
carry the PyTorch MeZO baseline (zo2-bench --mezo-baseline), its tokens/s is a dashed line
(one per dtype and B x T). Rows that failed are skipped. Needs matplotlib (Debian:
python3-matplotlib).
"""
import argparse
import json
import sys
from collections import defaultdict

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as e:
    sys.exit(f"plot_bench.py: matplotlib is not importable by {sys.executable} ({e}); "
             "install it (Debian: apt-get install python3-matplotlib) or run another python")


def read_rows(path):
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    sys.exit(f"plot_bench.py: {path}:{n}: not JSON ({e})")
    except OSError as e:
        sys.exit(f"plot_bench.py: {path}: {e}")
    return rows


def gib(b):
    return b / 2**30


def main():
    ap = argparse.ArgumentParser(description="tokens/s against the device-memory cap, from zo2-bench JSONL")
    ap.add_argument("jsonl", help="zo2-bench --jsonl output")
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--title", default="zo2-bench: tokens/s against the device-memory cap")
    a = ap.parse_args()
    rows = [r for r in read_rows(a.jsonl) if r.get("ok")]
    if not rows:
        sys.exit(f"plot_bench.py: {a.jsonl}: no successful rows to plot")

    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(len(presets), 1, figsize=(8, 3.6 * len(presets)), squeeze=False)
    for ax, preset in zip(axes[:, 0], presets):
        mine = [r for r in rows if r["preset"] == preset]
        finite = sorted({r["cap_bytes"] for r in mine if r["cap_bytes"] > 0})
        # "none" (the whole device): right of the largest finite cap, or at the peak used.
        if finite:
            none_x = gib(finite[-1]) * 2
        else:
            none_x = gib(max(max(r["device_peak_bytes"] for r in mine), 1))
        series = defaultdict(list)
        baselines = {}
        for r in mine:
            key = (r["storage"], r["compute"], r["batch"], r["seq"], r.get("offload", "auto"), r.get("device", ""))
            x = gib(r["cap_bytes"]) if r["cap_bytes"] > 0 else none_x
            series[key].append((x, r))
        for i, (key, pts) in enumerate(sorted(series.items())):
            pts.sort(key=lambda p: p[0])
            colour = f"C{i % 10}"
            storage, compute, b, t, offload, device = key
            label = f"{storage}/{compute} {b}×{t}" + (f" offload={offload}" if offload != "auto" else "")
            if len({k[5] for k in series}) > 1:
                label += f" {device}"
            xs = [p[0] for p in pts]
            ys = [p[1]["tokens_per_s"] for p in pts]
            ax.plot(xs, ys, "-", color=colour, label=label)
            for x, r in pts:
                resident = r.get("streamed_blocks", 1) == 0
                ax.plot([x], [r["tokens_per_s"]], "o", color=colour, markerfacecolor=colour if resident else "white")
            for p in pts:  # one baseline serves every series of the same shape and dtype
                if p[1].get("mezo_tokens_per_s"):
                    baselines[(p[1].get("mezo_dtype", ""), b, t, device)] = p[1]["mezo_tokens_per_s"]
        for j, ((dtype, b, t, device), tps) in enumerate(sorted(baselines.items())):
            ax.axhline(tps, color=f"C{(len(series) + j) % 10}" if len(baselines) > 1 else "0.3", linestyle="--",
                       linewidth=1, label=f"PyTorch MeZO {dtype} {b}×{t}")
        ticks = [gib(c) for c in finite] + [none_x]
        cap_text = {r["cap_bytes"]: r["cap"] for r in mine}
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([cap_text[c] for c in finite] + ["none"])
        ax.minorticks_off()
        ax.set_xlabel("device-memory cap (--gpu-mem)")
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        params = mine[0].get("params")
        ax.set_title(f"{preset}" + (f" ({params / 1e6:.1f}M params)" if params else "") +
                     (" — synthetic (aliased blocks)" if mine[0].get("synthetic") else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    fig.suptitle(a.title)
    fig.tight_layout()
    try:
        fig.savefig(a.out, format="png", dpi=110)
    except OSError as e:
        sys.exit(f"plot_bench.py: {a.out}: {e}")
    print(f"plot_bench.py: wrote {a.out} ({len(rows)} rows, {len(presets)} model(s))")


if __name__ == "__main__":
    main()
