"""Python step overhead over the C API (issue 22's bench figure).

    PYTHONPATH=build/python python3 python/bench/step_overhead.py [--preset opt-125m]
        [--batch 1] [--seq 128] [--warmup 3] [--steps 10] [--rounds 3] [--tiny-steps 2000]
        [--tune build/tools/zo2-tune] [--capi-ref build/python/zo2_py_capi_ref] [--work DIR]

Makes a random checkpoint of the preset's shape (zo2-tune init), then alternates, --rounds
times, a process that runs the steps through the C API in C (python/tests/capi_ref.c) and a
process that runs the same steps through zo2.Session.step — same model, batch, seed and
parameters (fp32, CPU, resident, all cores) — each timing --steps steps after --warmup. Prints the
mean step of each run, the medians, and the overhead (Python − C) / C. On a machine
shared with other work, run-to-run noise swamps a 1 % difference, so it then compares in
one process and one session: single steps alternating between Session.step and the same
C API call in a C++ loop (paired differences), on the preset and — where a step takes
~1 ms and thousands of steps average out the noise — on opt-tiny, which gives the
binding's own cost per step in microseconds. Nothing here is asserted: timings are for README and
bench/RESULTS.md.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def python_worker(a):
    import numpy as np
    import zo2

    ids = np.fromfile(a.ids, dtype="<i4").reshape(a.batch, a.seq)
    with zo2.Session(a.model, lr=1e-6, eps=1e-3, seed=0, max_seqs=a.batch, max_seq_len=a.seq) as s:
        for _ in range(a.warmup):
            s.step(ids)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            s.step(ids)
        print(json.dumps({"mean_step_s": (time.perf_counter() - t0) / a.steps}))


def paired(a, model, ids, chunks, chunk):
    """In one process and one session: `chunks` alternations of `chunk` steps through
    Session.step (a Python loop) and `chunk` steps through the C API in a C++ loop
    (zo2._zo2._capi_step_loop), so the machine's load drifts over both alike. Returns the
    per-step times (python, c) of each alternation."""
    import zo2
    from zo2 import _zo2

    with zo2.Session(model, lr=1e-6, eps=1e-3, seed=0, max_seqs=ids.shape[0], max_seq_len=ids.shape[1]) as s:
        for _ in range(a.warmup):
            s.step(ids)
        py_t, c_t = [], []
        for i in range(chunks):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    t0 = time.perf_counter()
                    for _ in range(chunk):
                        s.step(ids)
                    py_t.append((time.perf_counter() - t0) / chunk)
                else:
                    # timed inside, around the C loop alone: the call's entry (batch conversion, GIL)
                    # counts against Python, not C
                    c_t.append(_zo2._capi_step_loop(s, ids, chunk) / chunk)
    return py_t, c_t


def report_paired(name, py_t, c_t):
    diffs = [p - c for p, c in zip(py_t, c_t)]
    p, c, d = statistics.median(py_t), statistics.median(c_t), statistics.median(diffs)
    print(f"{name} (same process, {len(diffs)} alternations): median Python {p:.6f} s/step, C API loop {c:.6f} "
          f"s/step; median paired difference {d * 1e6:+.1f} us/step ({d / c * 100:+.3f} %)")
    return d


def c_run(a, model, ids_file, env):
    out = subprocess.run([a.capi_ref, str(model), str(ids_file), str(a.batch), str(a.seq), str(a.warmup), "1e-6",
                          "1e-3", "0", str(a.steps)], check=True, capture_output=True, text=True, env=env).stdout
    return float(out.split("mean_step_s ")[1])


def py_run(a, model, ids_file, env):
    out = subprocess.run([sys.executable, __file__, "--worker", "--model", str(model), "--ids", str(ids_file),
                          "--batch", str(a.batch), "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps",
                          str(a.steps)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)["mean_step_s"]


def compare(a, preset, work):
    model = work / preset
    if not (model / "config.json").exists():
        subprocess.run([a.tune, "-q", "init", "--preset", preset, "--out", str(model)], check=True)
    import numpy as np

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    ids_file = work / f"{preset}-ids.bin"
    np.random.default_rng(0).integers(0, vocab, (a.batch, a.seq)).astype("<i4").tofile(ids_file)
    env = dict(os.environ)
    cs, ps = [], []
    for r in range(a.rounds):
        cs.append(c_run(a, model, ids_file, env))
        ps.append(py_run(a, model, ids_file, env))
        print(f"  {preset} round {r + 1}: C API {cs[-1]:.6f} s/step, Python {ps[-1]:.6f} s/step", flush=True)
    c, p = statistics.median(cs), statistics.median(ps)
    print(f"{preset} {a.batch}x{a.seq}: median C API {c:.6f} s/step, Python {p:.6f} s/step, "
          f"overhead {p - c:+.6f} s ({(p - c) / c * 100:+.2f} %)")
    return c, p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[2]
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model")
    ap.add_argument("--ids")
    ap.add_argument("--preset", default="opt-125m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=10, help="alternating single steps of the in-process comparison")
    ap.add_argument("--tiny-steps", type=int, default=2000, help="steps per run of the opt-tiny comparison (0: skip)")
    ap.add_argument("--tune", default=str(root / "build" / "tools" / "zo2-tune"))
    ap.add_argument("--capi-ref", default=str(root / "build" / "python" / "zo2_py_capi_ref"))
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    if a.worker:
        return python_worker(a)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="zo2-py-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    import numpy as np

    c, p = compare(a, a.preset, work)
    ids = np.fromfile(work / f"{a.preset}-ids.bin", dtype="<i4").reshape(a.batch, a.seq)
    d_big = report_paired(f"{a.preset} {a.batch}x{a.seq}", *paired(a, work / a.preset, ids, a.pairs, 1))
    if a.tiny_steps > 0:
        tiny = argparse.Namespace(**{**vars(a), "steps": a.tiny_steps, "warmup": 50, "batch": 1, "seq": 16})
        compare(tiny, "opt-tiny", work)
        tids = np.fromfile(work / "opt-tiny-ids.bin", dtype="<i4").reshape(1, 16)
        d = report_paired("opt-tiny 1x16", *paired(tiny, work / "opt-tiny", tids, 40, max(1, a.tiny_steps // 40)))
        print(f"binding cost per step: {d * 1e6:+.1f} us on opt-tiny = {d / c * 100:+.4f} % of the {a.preset} "
              f"C API step ({c:.3f} s)")


if __name__ == "__main__":
    main()
