"""zo2.Session as ranks of an MPI job: the same script under mpirun -np 2 with parallel="perturbation=2"
ends with the weights of one process (fp32), and every rank knows its place."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import zo2

SCRIPT = r"""
import sys
import numpy as np
import zo2
model_dir, out, layout = sys.argv[1], sys.argv[2], sys.argv[3]
kw = {} if layout == "single" else {"parallel": layout}
with zo2.Session(model_dir, lr=1e-3, seed=3, max_seqs=4, max_seq_len=12, n_threads=1, offload="all", window=2,
                 **kw) as s:
    ids = (np.arange(48, dtype=np.int32).reshape(4, 12) * 7 % 50).astype(np.int32)
    for _ in range(5):
        r = s.step(ids)
    s.save(out)
    print(s.rank, s.ranks, s.params["parallel"], flush=True)
"""


def test_one_process_has_rank_zero_of_one(tiny):
    with zo2.Session(tiny, max_seqs=1, max_seq_len=8) as s:
        assert (s.rank, s.ranks) == (0, 1)
        assert s.params["parallel"] is None and s.params["share_host_image"] is True
    with pytest.raises(zo2.InvalidArgumentError, match="the run has 1 rank"):
        zo2.Session(tiny, max_seqs=2, max_seq_len=8, parallel="data=2")
    with pytest.raises(zo2.InvalidArgumentError, match="unknown factor 'tensor'"):
        zo2.Session(tiny, max_seqs=2, max_seq_len=8, parallel="tensor=2")


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (Open MPI: apt-get install openmpi-bin)")
def test_perturbation_pair_under_mpirun_equals_one_process(tiny, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    single = subprocess.run([sys.executable, str(script), str(tiny), str(tmp_path / "one"), "single"], env=env,
                            check=True, capture_output=True, text=True)
    assert single.stdout.split() == ["0", "1", "None"]
    pair = subprocess.run(["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", "2", sys.executable, str(script),
                           str(tiny), str(tmp_path / "pair"), "perturbation=2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert pair.returncode == 0, pair.stderr
    assert sorted(pair.stdout.split("\n")[:2]) == ["0 2 perturbation=2", "1 2 perturbation=2"]
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    two = (tmp_path / "pair" / "model.safetensors").read_bytes()
    assert one == two
