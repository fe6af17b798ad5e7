"""Python step overhead over the C API (issue 22's bench figure).

    PYTHONPATH=build/python python3 python/bench/step_overhead.py [--preset opt-125m]
        [--batch 1] [--seq 128] [--warmup 3] [--steps 10] [--rounds 3] [--tiny-steps 2000]
        [--tune build/tools/zo2-tune] [--capi-ref build/python/zo2_py_capi_ref] [--work DIR]

Makes a random checkpoint of the preset's shape (zo2-tune init), then alternates, --rounds
times, a process that runs the steps through the C API in C (python/tests/capi_ref.c) and a
process that runs the same steps through zo2.Session.step — same model, batch, seed and
parameters (fp32, CPU, resident, all cores) — each timing --steps steps after --warmup. Prints the
mean step of each run, the medians, and the overhead (Python − C) / C. It also measures
the per-call cost of the binding alone on opt-tiny (where a step takes ~1 ms), as an
absolute figure in microseconds. Nothing here is asserted: timings are for README and
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
    ap.add_argument("--tiny-steps", type=int, default=2000, help="steps per run of the opt-tiny comparison (0: skip)")
    ap.add_argument("--tune", default=str(root / "build" / "tools" / "zo2-tune"))
    ap.add_argument("--capi-ref", default=str(root / "build" / "python" / "zo2_py_capi_ref"))
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    if a.worker:
        return python_worker(a)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="zo2-py-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    compare(a, a.preset, work)
    if a.tiny_steps > 0:
        tiny = argparse.Namespace(**{**vars(a), "steps": a.tiny_steps, "warmup": 50, "batch": 1, "seq": 16})
        c, p = compare(tiny, "opt-tiny", work)
        print(f"binding cost per step (opt-tiny 1x16): {(p - c) * 1e6:+.1f} us")


if __name__ == "__main__":
    main()
