"""zo2.Session against the C API, parameter round trips, arrays, threads and Ctrl-C."""
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

import zo2


def batch(vocab, n_seq=2, n_tokens=16, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n_seq, n_tokens)).astype(np.int32)


def bits(x):
    return int(np.float32(x).view(np.uint32))


def test_step_equals_c_api_bit_for_bit(tiny, capi_ref, tmp_path):
    model = zo2.Model.load(tiny)
    ids = batch(model.n_vocab)
    (tmp_path / "ids.bin").write_bytes(ids.astype("<i4").tobytes())
    ref = subprocess.run([str(capi_ref), str(tiny), str(tmp_path / "ids.bin"), "2", "16", "6", "0.001", "0.001", "7"],
                         check=True, capture_output=True, text=True).stdout.splitlines()
    steps = [[int(w, 16) for w in line.split()] for line in ref[:6]]
    ref_eval = int(ref[6].split()[1], 16)
    ref_lp = [int(w, 16) for w in ref[7].split()[1:]]
    # The same steps through Python, with the ids as int32 (no copy) and as int64 (converted).
    for arr in (ids, ids.astype(np.int64)):
        with zo2.Session(model, lr=0.001, eps=0.001, seed=7, max_seqs=2, max_seq_len=16) as s:
            got = []
            for _ in range(6):
                r = s.step(arr)
                got.append([bits(r.loss_plus), bits(r.loss_minus), bits(r.projected_grad)])
            assert got == steps
            assert bits(s.eval(arr)) == ref_eval
            lp = s.token_logprobs(arr)
            assert lp.dtype == np.float32 and lp.shape == (2, 16)
            assert [int(v) for v in lp.view(np.uint32).ravel()] == ref_lp
            assert s.step_index == 6


def test_step_result_fields(tiny):
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        r = s.step(batch(512))
        assert r.step == 0
        assert r.projected_grad == pytest.approx((r.loss_plus - r.loss_minus) / (2 * 1e-3), rel=1e-2)
        assert r.loss == pytest.approx((r.loss_plus + r.loss_minus) / 2)
        assert "loss_plus" in repr(r)
        assert s.step(batch(512)).step == 1


# Every session parameter: a non-default value in, the same value out of .params, and its
# effect visible through the C API where one is observable.
ROUND_TRIPS = {
    "lr": (2e-3, float(np.float32(2e-3))),
    "eps": (5e-4, float(np.float32(5e-4))),
    "weight_decay": (0.01, float(np.float32(0.01))),
    "seed": (2**63 + 5, 2**63 + 5),
    "device": ("cpu", "cpu"),
    "gpu_mem": ("64M", 64 << 20),
    "offload": ("all", "all"),
    "window": (2, 2),
    "storage_dtype": ("bf16", "bf16"),
    "compute_dtype": ("fp32", "fp32"),
    "n_threads": (1, 1),
    "max_seqs": (3, 3),
    "max_seq_len": (8, 8),
    "training": (False, False),
    "seed_log": ("SEEDLOG", "SEEDLOG"),
    "seed_log_append": (True, True),
    "first_step": (4, 4),
    "save_dtype": ("bf16", "bf16"),
    "save_shard_size": ("1M", 1 << 20),
    "optimizer": ("zo-sgd-sign", "zo-sgd-sign"),
    "directions": (2, 2),
    "difference": ("forward", "forward"),
    "momentum": (0.5, 0.5),
    "beta1": (0.8, float(np.float32(0.8))),
    "beta2": (0.99, float(np.float32(0.99))),
    "adam_eps": (1e-6, float(np.float32(1e-6))),
    "state_dtype": ("bf16", "bf16"),
    "resume_state": (True, True),
    "lora_r": (4, 4),
    "lora_alpha": (8.0, 8.0),
    "lora_targets": (["q_proj", "fc1"], "q_proj,fc1"),
    "adapter": (None, None),
    "prefix_tokens": (3, 3),
    "generate_seqs": (2, 2),
    "kv_cache": ("host", "host"),
    "prefill_chunk": (4, 4),
    # Ranks (test_ranks.py runs them under mpirun); one process takes the single layout.
    "parallel": ("single", "single"),
    "rank_timeout": (30.0, 30.0),
    "share_host_image": (False, False),
    "sliced_upload": (True, True),
    # The disk tier (test_train.py trains through it).
    "host_mem": ("8M", 8 << 20),
    "disk_dir": ("DISKDIR", "DISKDIR"),  # a path under tmp_path, with host_mem
    "disk_lag": (4, 4),
    "disk_staging": (3, 3),
    # Sub-block streaming: a size string, bytes, "auto" or "off".
    "tile": ("4K", 4096),
}


def test_every_parameter_is_covered():
    with pytest.raises(TypeError) as e:
        zo2.Session("unused", no_such_parameter=1)
    listed = str(e.value).split("(the parameters: ")[1].rstrip(")").split(", ")
    assert sorted(listed) == sorted(ROUND_TRIPS)


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_parameter_round_trips(tiny, tmp_path, name):
    value, expected = ROUND_TRIPS[name]
    if name == "seed_log":
        value = expected = str(tmp_path / "seeds.jsonl")
    kw = {"max_seqs": 2, "max_seq_len": 16}
    kw[name] = value
    if name == "seed_log_append":
        kw["seed_log"] = str(tmp_path / "seeds.jsonl")
    if name == "disk_dir":
        kw[name] = expected = str(tmp_path / "disk")
        kw["host_mem"] = "8M"  # a disk directory serves a host memory cap (this model fits under it)
    if name == "generate_seqs":
        kw["training"] = False  # generation needs an eval-only session
    # A keyword that another gives its meaning to is refused without it (api/options.h), as the flags are.
    if name in ("lora_alpha", "lora_targets"):
        kw["lora_r"] = 4
    if name in ("kv_cache", "prefill_chunk"):
        kw["generate_seqs"] = 2
        kw["training"] = False
    if name in ("disk_lag", "disk_staging"):
        kw["host_mem"] = "8M"  # the disk tier's fields serve a host memory cap (this model fits under it)
    if name == "momentum":
        kw["optimizer"] = "zo-sgd-momentum"  # a rule's own keyword is refused for another rule
    if name in ("beta1", "beta2", "adam_eps", "state_dtype"):
        kw["optimizer"] = "zo-adam"
    defaults = zo2.Session(tiny, max_seqs=2, max_seq_len=16).params
    with zo2.Session(tiny, **kw) as s:
        p = s.params
        assert p[name] == expected
        assert set(p) == set(ROUND_TRIPS)
        for other in p:
            if other not in kw:
                assert p[other] == defaults[other], other
        plan = s.plan()
        if name == "offload":
            assert plan.n_streamed == plan.n_blocks
        if name == "window":
            assert plan.window in (0, 2)
        if name == "first_step":
            assert s.step_index == 4
        if name == "training":
            with pytest.raises(zo2.InvalidArgumentError):
                s.step(batch(512, 2, 16))
        if name == "max_seqs":
            s.step(batch(512, 3, 16))
            with pytest.raises(zo2.InvalidArgumentError, match="max_seqs = 3"):
                s.step(batch(512, 4, 16))
        if name == "seed_log":
            s.step(batch(512))
            assert '"step":0' in open(value).read().replace(" ", "")
        if name == "generate_seqs":
            assert len(s.generate([[1, 2, 3]], max_new_tokens=2)[0].tokens) == 2
        if name == "lr":
            s.set_lr(0.5)
            assert s.params["lr"] == 0.5


def test_set_lr_refuses_bad_values(tiny):
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        for bad in (-1.0, float("nan"), float("inf"), 1e39):
            with pytest.raises(zo2.InvalidArgumentError, match="lr"):
                s.set_lr(bad)
        assert s.params["lr"] == float(np.float32(1e-3))


ERRORS = [
    (dict(lr=-1.0), zo2.InvalidArgumentError, "zo2_session_init: lr -1"),
    (dict(lr=1e39), zo2.InvalidArgumentError, "lr 1e+39"),
    (dict(eps=0.0), zo2.InvalidArgumentError, "eps 0"),
    (dict(eps=2.0), zo2.InvalidArgumentError, "eps 2"),
    (dict(weight_decay=-0.5), zo2.InvalidArgumentError, "weight_decay"),
    (dict(window=0), zo2.InvalidArgumentError, "window 0"),
    (dict(window=2**40), zo2.InvalidArgumentError, "window"),
    (dict(max_seqs=0), zo2.InvalidArgumentError, "max_seqs 0"),
    (dict(max_seq_len=10**6), zo2.InvalidArgumentError, "max_position_embeddings"),
    (dict(device="tpu"), zo2.InvalidArgumentError, "device 'tpu'"),
    (dict(offload="some"), zo2.InvalidArgumentError, "offload 'some'"),
    (dict(storage_dtype="int3"), zo2.InvalidArgumentError, "storage_dtype 'int3' is not a known dtype"),
    (dict(storage_dtype="fp64"), zo2.UnsupportedError, "storage_dtype 'fp64' is not supported"),
    (dict(compute_dtype="bf16"), zo2.UnsupportedError, "bf16"),
    (dict(gpu_mem="12Q"), zo2.InvalidArgumentError, "gpu_mem: '12Q'"),
    (dict(gpu_mem=4096), zo2.OutOfMemoryError, "minimum"),
    (dict(save_shard_size=0), zo2.InvalidArgumentError, "save_shard_bytes 0"),
    (dict(seed=-1), zo2.InvalidArgumentError, "seed -1"),
    (dict(first_step=-2), zo2.InvalidArgumentError, "first_step -2"),
    (dict(seed_log=""), zo2.InvalidArgumentError, "seed_log is empty"),
    (dict(parallel=""), zo2.InvalidArgumentError, "parallel is empty (use None"),
    (dict(seed_log="run/\0seeds"), zo2.InvalidArgumentError, "seed_log contains a NUL character"),
    (dict(device="cpu\0cuda"), zo2.InvalidArgumentError, "device contains a NUL character"),
    # Wrong types: zo2.InvalidTypeError, a TypeError that is also an InvalidArgumentError.
    (dict(lr="fast"), zo2.InvalidTypeError, "lr must be a number, not str ('fast')"),
    (dict(window=2.0), zo2.InvalidTypeError, "window must be an int, not float"),
    (dict(seed=None), zo2.InvalidTypeError, "seed must be an int, not NoneType"),
    (dict(device=0), zo2.InvalidTypeError, "device must be a str, not int"),
    (dict(training=1), zo2.InvalidTypeError, "training must be a bool, not int"),
    (dict(seed_log=3), zo2.InvalidTypeError, "seed_log must be a path (str, bytes or os.PathLike), not int"),
]


def test_numpy_integers_are_ints(tiny):
    np = pytest.importorskip("numpy")
    with zo2.Session(tiny, max_seqs=np.int32(2), max_seq_len=np.int64(16), n_threads=np.uint8(1), seed=np.uint64(3)):
        pass
    with pytest.raises(zo2.InvalidTypeError, match="n_threads must be an int, not numpy.bool"):
        zo2.Session(tiny, max_seqs=2, max_seq_len=16, n_threads=np.bool_(True))
    with pytest.raises(zo2.InvalidTypeError, match="window must be an int, not numpy.float64"):
        zo2.Session(tiny, max_seqs=2, max_seq_len=16, window=np.float64(2.0))


@pytest.mark.parametrize("kw,cls,message", ERRORS, ids=[repr(e[0]) for e in ERRORS])
def test_session_errors(tiny, kw, cls, message):
    with pytest.raises(cls) as e:
        zo2.Session(tiny, **{"max_seqs": 2, "max_seq_len": 16, **kw})
    assert message in str(e.value)
    assert isinstance(e.value, zo2.Error) and e.value.status == cls.status


def test_file_errors(tmp_path, tiny):
    with pytest.raises(zo2.FileIOError, match="config.json") as e:
        zo2.Model.load(tmp_path / "missing")
    assert isinstance(e.value, OSError)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    with pytest.raises(zo2.FormatError, match="config.json"):
        zo2.Model.load(bad)
    with pytest.raises(zo2.FileIOError):
        zo2.Tokenizer.from_dir(tmp_path / "missing")


def test_device_error_without_cuda(tiny):
    try:
        s = zo2.Session(tiny, device="cuda:63", max_seqs=1, max_seq_len=8)
    except zo2.DeviceError as e:
        assert "cuda" in str(e).lower()
    else:  # pragma: no cover - a machine with 64 GPUs
        s.close()


def test_batch_errors_change_nothing(tiny):
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        ids = batch(512)
        s.step(ids)
        bad = ids.copy()
        bad[0, 3] = 512
        with pytest.raises(zo2.InvalidArgumentError, match="512"):
            s.step(bad)
        with pytest.raises(zo2.InvalidArgumentError, match="outside int32"):
            s.step(ids.astype(np.int64) + 2**32)
        with pytest.raises(zo2.InvalidArgumentError, match="dtype"):
            s.step(ids.astype(np.float32))
        with pytest.raises(zo2.InvalidArgumentError, match="attention_mask has shape"):
            s.step(ids, attention_mask=np.ones((2, 15), np.int32))
        with pytest.raises(zo2.InvalidArgumentError, match="n_tokens 17"):
            s.step(batch(512, 2, 17))
        with pytest.raises(zo2.InvalidArgumentError, match="nothing to predict|no target"):
            s.step(ids, labels=np.full_like(ids, -100))
        assert s.step_index == 1
        s.step(ids)
        assert s.step_index == 2
    with pytest.raises(zo2.InvalidArgumentError, match="closed"):
        s.step(ids)


def test_masks_labels_and_layouts(tiny):
    ids = batch(512)
    mask = np.ones_like(ids)
    mask[1, 10:] = 0
    labels = ids.copy()
    labels[:, :4] = -100
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, training=False) as s:
        base = s.eval(ids, attention_mask=mask, labels=labels)
        assert s.eval(ids, attention_mask=mask.astype(bool), labels=labels.astype(np.int64)) == base
        assert s.eval(np.asfortranarray(ids), attention_mask=mask, labels=labels) == base
        assert s.eval(ids.tolist(), attention_mask=mask.tolist(), labels=labels.tolist()) == base
        assert s.eval(ids[0]) == s.eval(ids[:1])
        lp = s.token_logprobs(ids, attention_mask=mask)
        assert (lp[1, 9:] == 0).all() and (lp[:, -1] == 0).all() and (lp[0, :-1] < 0).all()


def test_choices(tiny):
    ids = batch(512, 4, 12)
    labels = np.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    with zo2.Session(tiny, lr=1e-3, max_seqs=4, max_seq_len=12) as s:
        loss = s.eval_choices(ids, [2, 2], [0, 1], labels=labels)
        r = s.step_choices(ids, group_sizes=[2, 2], group_labels=[0, 1], labels=labels)
        assert np.isfinite([loss, r.loss_plus, r.loss_minus]).all()
        with pytest.raises(zo2.InvalidArgumentError):
            s.step_choices(ids, [2, 1], [0, 0], labels=labels)
        with pytest.raises(zo2.InvalidArgumentError, match="group_labels has 1"):
            s.step_choices(ids, [2, 2], [0], labels=labels)
        with pytest.raises(zo2.InvalidArgumentError, match="option group 0: size -1"):
            s.step_choices(ids, [-1, 3], [0, 0], labels=labels)
        with pytest.raises(zo2.InvalidArgumentError, match="input_ids is empty: no token ids"):
            s.step([])
        assert s.step_index == 1


def test_save_and_reload(tiny, tmp_path):
    ids = batch(512)
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        for _ in range(3):
            s.step(ids)
        loss = s.eval(ids)
        s.save(tmp_path / "run")
        with pytest.raises(zo2.InvalidArgumentError):
            s.save(tiny)  # the plain checkpoint it was loaded from
        s.save(os.fsencode(tmp_path / "bytes"))  # a bytes path is the path, not "b'...'"
    with zo2.Model.load(tmp_path / "run") as m, zo2.Session(m, max_seqs=2, max_seq_len=16, training=False) as s2:
        assert bits(s2.eval(ids)) == bits(loss)
    assert m.closed
    with zo2.Model.load(os.fsencode(tmp_path / "bytes")) as m:
        assert m.n_layer == 2 and m.path == str(tmp_path / "bytes")
    assert not any(p.name.startswith("b'") for p in __import__("pathlib").Path.cwd().iterdir())


def test_seed_log_and_save_never_replace_what_is_there(tiny, tmp_path, tune):
    # seed_log= names a new log: never an existing file that is not one (a model's weights
    # named by mistake were truncated), nor another run's log; an empty file is taken.
    ids = batch(512)
    weights = (tiny / "model.safetensors").read_bytes()
    with pytest.raises(zo2.InvalidArgumentError, match="exists and is not a seed log"):
        zo2.Session(tiny, max_seqs=2, max_seq_len=16, seed_log=tiny / "model.safetensors")
    assert (tiny / "model.safetensors").read_bytes() == weights
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16, seed_log=tmp_path / "a.jsonl") as s:
        s.step(ids)
    log = (tmp_path / "a.jsonl").read_bytes()
    with pytest.raises(zo2.InvalidArgumentError, match="already holds a seed log"):
        zo2.Session(tiny, max_seqs=2, max_seq_len=16, seed_log=tmp_path / "a.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == log
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16, seed_log=tmp_path / "empty.jsonl") as s:
        s.step(ids)
    # save: a training run's directory takes only that run's checkpoints.
    data = tmp_path / "d.safetensors"
    subprocess.run([str(tune), "-q", "synth-data", "--out", str(data), "--model", str(tiny), "--rows", "8", "--seq",
                    "8"], check=True)
    subprocess.run([str(tune), "-q", "train", "--model", str(tiny), "--data", str(data), "--out",
                    str(tmp_path / "run"), "--steps", "2", "--batch-size", "2"], check=True)
    run_weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16) as s:
        with pytest.raises(zo2.InvalidArgumentError, match="holds a training run"):
            s.save(tmp_path / "run")
        for sub in ("current", "step-00000002"):  # nor one of its checkpoints
            with pytest.raises(zo2.InvalidArgumentError, match="is a checkpoint of the training run"):
                s.save(tmp_path / "run" / sub)
        s.save(tmp_path / "run" / "export")  # a new directory inside it is not
        # Nor a plain checkpoint (another model's weights): a save would replace its files.
        other = tmp_path / "other"
        shutil.copytree(tiny, other)
        with pytest.raises(zo2.InvalidArgumentError, match=r"holds a checkpoint \(config.json, model.safetensors"):
            s.save(other)
        assert (other / "model.safetensors").read_bytes() == weights and not (other / "current").exists()
        s.save(tmp_path / "run" / "export")  # its own checkpoint again: a run layout, continued
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == run_weights
    # A resume starts at the step its checkpoint was saved at: another first_step would cut
    # the seed log to it while the weights are those of the saved step.
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16, seed_log=tmp_path / "r.jsonl") as s:
        s.step(ids)
        s.step(ids)
        s.save(tmp_path / "r")
    log = (tmp_path / "r.jsonl").read_bytes()
    for first in (0, 1, 3):
        with pytest.raises(zo2.InvalidArgumentError, match=f"first_step {first}: .* saved at step 2"):
            zo2.Session(tmp_path / "r", max_seqs=2, max_seq_len=16, seed_log=tmp_path / "r.jsonl",
                        seed_log_append=True, first_step=first)
    assert (tmp_path / "r.jsonl").read_bytes() == log
    with zo2.Session(tmp_path / "r", lr=1e-3, max_seqs=2, max_seq_len=16, seed_log=tmp_path / "r.jsonl",
                     seed_log_append=True, first_step=2) as s:
        s.step(ids)
        assert s.step_index == 3
    # zo2-tune train --resume of a session's run: its state records no training flags, so
    # they are given again (the defaults would silently change lr 1e-3 to 1e-6).
    (tmp_path / "api").mkdir()
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=8, seed_log=tmp_path / "api" / "seed_log.jsonl") as s:
        s.step(ids[:, :8])
        s.save(tmp_path / "api")
    cmd = [str(tune), "-q", "train", "--resume", str(tmp_path / "api"), "--out", str(tmp_path / "api"), "--data",
           str(data)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "does not record the run's --lr, --eps, --weight-decay, --batch-size, --steps" in p.stderr, p.stderr
    p = subprocess.run(cmd + ["--lr", "1e-3", "--eps", "1e-3", "--weight-decay", "0", "--batch-size", "2",
                              "--steps", "3"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_plan(tiny):
    p = zo2.plan(tiny, max_seqs=2, max_seq_len=16, gpu_mem="64M", offload="all")
    assert p.n_blocks == 2 and p.n_streamed == 2 and p.device_bytes <= p.cap_bytes == 64 << 20
    with pytest.raises(zo2.OutOfMemoryError) as e:
        zo2.plan(tiny, max_seqs=2, max_seq_len=16, gpu_mem=4096)
    assert e.value.minimum_cap_bytes > 4096 and e.value.n_blocks == 2


def test_plan_with_tiles(tiny):
    blocks = zo2.plan(tiny, max_seqs=2, max_seq_len=16, gpu_mem="64M", offload="all")
    assert blocks.tile_slots == 0 and blocks.window > 0
    tiles = zo2.plan(tiny, max_seqs=2, max_seq_len=16, gpu_mem="64M", offload="all", tile=4096)
    assert tiles.window == 0 and tiles.tile_slots > 1 and tiles.tiles_per_block > 6
    assert 0 < tiles.tile_slot_bytes < tiles.block_bytes
    assert tiles.h2d_bytes_per_step == blocks.h2d_bytes_per_step
    assert zo2.plan(tiny, max_seqs=2, max_seq_len=16, gpu_mem="64M", offload="all", tile="4K") == tiles
    with pytest.raises(zo2.InvalidArgumentError, match="tile often"):
        zo2.plan(tiny, max_seqs=2, max_seq_len=16, tile="often")
    with pytest.raises(zo2.InvalidArgumentError, match="tile -2 is negative"):  # ("off" is the C field's -1)
        zo2.plan(tiny, max_seqs=2, max_seq_len=16, tile=-2)
    # Streamed by tiles at the default tile size (64M of fp32: 2^24 elements) trains to the
    # resident run's bits.
    ids = batch(512)
    images = []
    for kw in ({"offload": "none"}, {"offload": "all", "gpu_mem": "64M", "tile": "64M"}):
        with zo2.Session(tiny, max_seqs=2, max_seq_len=16, lr=1e-3, **kw) as s:
            for _ in range(3):
                s.step(ids)
            images.append(bits(s.eval(ids)))
    assert images[0] == images[1]


def test_torch_tensors(tiny):
    torch = pytest.importorskip("torch")
    ids = batch(512)
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, training=False) as s:
        ref = s.eval(ids)
        assert s.eval(torch.from_numpy(ids)) == ref
        assert s.eval(torch.from_numpy(ids).long(), attention_mask=torch.ones(2, 16, dtype=torch.bool)) == ref
        assert s.eval(torch.from_numpy(np.ascontiguousarray(ids.T)).t()) == ref  # non-contiguous: converted
        labels = torch.from_numpy(ids).long()
        labels[:, :3] = -100
        assert s.eval(torch.from_numpy(ids), labels=labels) == s.eval(ids, labels=labels.numpy())
        with pytest.raises(zo2.InvalidArgumentError, match="dtype"):
            s.eval(torch.zeros(2, 16))
        lp = s.token_logprobs(torch.from_numpy(ids))
        assert torch.from_numpy(lp).shape == (2, 16)


def _run(session, ids, n):
    return [(bits(r.loss_plus), bits(r.loss_minus), bits(r.projected_grad)) for r in (session.step(ids) for _ in range(n))]


def test_two_sessions_two_threads(tiny):
    ids = [batch(512, 4, 16, seed=1), batch(512, 4, 16, seed=2)]
    kw = dict(lr=1e-3, max_seqs=4, max_seq_len=16, n_threads=1)
    expected = []
    for i in range(2):
        with zo2.Session(tiny, seed=i, **kw) as s:
            expected.append(_run(s, ids[i], 8))
    sessions = [zo2.Session(tiny, seed=i, **kw) for i in range(2)]
    got = [None, None]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        got[i] = _run(sessions[i], ids[i], 8)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    for s in sessions:
        s.close()


def test_one_session_from_two_threads_is_serialized(tiny):
    ids = batch(512)
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        threads = [threading.Thread(target=lambda: [s.step(ids) for _ in range(5)]) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.step_index == 10


def _run_script(code, timeout=120):
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                          env=os.environ, timeout=timeout)


def test_close_racing_steps_on_other_threads_never_uses_the_freed_session(tiny):
    # A step waiting for the session's lock while close() frees it must find it closed
    # (adversarial pass 65: it took the lock before close() cleared the handle, and stepped on
    # freed memory). In a child: a crash fails the test instead of ending the run.
    code = f"""
import threading, numpy as np, zo2
ids = (np.arange(32).reshape(2, 16) * 7 + 3) % 512
m = zo2.Model.load({str(tiny)!r})
for round in range(30):
    s = zo2.Session(m, lr=1e-3, max_seqs=2, max_seq_len=16, n_threads=1)
    errors = []
    def loop():
        try:
            while True:
                s.step(ids)
        except zo2.InvalidArgumentError as e:
            errors.append(str(e))
    threads = [threading.Thread(target=loop) for _ in range(3)]
    for t in threads:
        t.start()
    s.step(ids)
    s.close()
    for t in threads:
        t.join()
    assert errors == ["the session is closed"] * 3, errors
print("ok")
"""
    r = _run_script(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_a_daemon_thread_inside_a_step_when_the_script_ends_exits_cleanly(tiny):
    # The interpreter finalizes while the daemon thread is inside a step: taking the GIL back
    # must not abort the process (adversarial pass 65: pthread_exit through pybind11's
    # noexcept gil_scoped_release, "terminate called without an active exception").
    code = f"""
import threading, time, numpy as np, zo2
ids = (np.arange(32).reshape(2, 16) * 7 + 3) % 512
s = zo2.Session({str(tiny)!r}, lr=1e-3, max_seqs=2, max_seq_len=16, n_threads=1)
def loop():
    while True:
        s.step(ids)
for _ in range(4):  # (several: some wait for the GIL as finalization begins)
    threading.Thread(target=loop, daemon=True).start()
time.sleep(0.3)
print("exiting", flush=True)
"""
    for _ in range(3):
        r = _run_script(code)
        assert r.returncode == 0 and r.stdout.strip() == "exiting", f"rc {r.returncode}: {r.stdout}{r.stderr}"
        assert "terminate" not in r.stderr and "Fatal Python error" not in r.stderr, r.stderr


def test_a_model_loaded_by_a_relative_path_keeps_its_directory_after_a_chdir(tiny, tune, tmp_path, monkeypatch):
    # Another checkpoint of the same name (other weights) in the new working directory: the
    # session still reads the one loaded (adversarial pass 65: it read the other, silently).
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(tiny, tmp_path / "a" / "m")
    subprocess.run([str(tune), "-q", "init", "--preset", "opt-tiny", "--seed", "2", "--out",
                    str(tmp_path / "b" / "m")], check=True)
    ids = batch(512)
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, training=False) as s:
        expected = s.eval(ids)
    monkeypatch.chdir(tmp_path / "a")
    m = zo2.Model.load("m")
    assert m.path == str(tmp_path / "a" / "m")
    assert zo2.Model.load("./m/").path == str(tmp_path / "a" / "m")
    monkeypatch.chdir(tmp_path / "b")
    with zo2.Session(m, max_seqs=2, max_seq_len=16, training=False) as s:
        assert bits(s.eval(ids)) == bits(expected)
        assert s.model_path == str(tmp_path / "a" / "m")
    m.close()


def test_steps_release_the_gil(tiny):
    # With a huge switch interval this thread never gives up the GIL by itself: the spinner
    # can only run while a step has released it.
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1
            stop.wait(0.0001)

    ids = batch(512, 8, 64)
    old = sys.getswitchinterval()
    with zo2.Session(tiny, lr=1e-3, max_seqs=8, max_seq_len=64, n_threads=1) as s:
        t = threading.Thread(target=spin)
        t.start()
        try:
            sys.setswitchinterval(1000)
            during = 0
            for _ in range(20):
                before = counter[0]
                s.step(ids)
                during += counter[0] - before
        finally:
            sys.setswitchinterval(old)
            stop.set()
            t.join()
    assert during > 0


def test_ctrl_c_stops_a_step_loop_cleanly(tiny, tmp_path):
    ids = batch(512)
    done = 0
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        with pytest.raises(KeyboardInterrupt):
            for i in range(100000):
                s.step(ids)
                done += 1
                if i == 3:
                    os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: Python's handler runs
        assert s.step_index in (done, done + 1)
        s.step(ids)  # still usable
        s.save(tmp_path / "after-ctrl-c")
    assert (tmp_path / "after-ctrl-c" / "config.json").exists()


def test_tokenizer(tune):
    from conftest import SOURCE
    tok = zo2.Tokenizer.from_dir(SOURCE / "data" / "gpt2")
    text = "Hello world, zeroth-order tuning!"
    cli = subprocess.run([str(tune), "tokenize", "--tokenizer", str(SOURCE / "data" / "gpt2"), "--text", text],
                         check=True, capture_output=True, text=True).stdout
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == [int(x) for x in cli.strip()[1:-1].split(",")]
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int64), as_bytes=True) == text.encode()
    assert tok.vocab_size == 50257 and tok.kind
    assert tok.token_to_id("Hello") == ids[0] and tok.id_to_token(ids[0]) == "Hello"
    assert tok.encode(text) == tok.special_prefix + ids


def wait_for_child(pid, seconds=30):
    """The exit status of a forked child; fails the test (killing the child) if it hangs."""
    for _ in range(int(seconds * 10)):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        threading.Event().wait(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung")


def test_a_forked_child_never_hangs_on_an_inherited_session(tiny):
    # The child inherits the session but not its worker threads: using it fails at once with
    # a clear error, and freeing it (as the child's interpreter exit does) does not hang.
    ids = batch(512)
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        s.step(ids)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then exit through the interpreter (atexit, GC)
            os.close(r)
            lines = []
            for call in (lambda: s.step(ids), lambda: s.eval(ids), lambda: s.step_index):
                try:
                    call()
                    lines.append("no error")
                except zo2.InvalidArgumentError as e:
                    lines.append(str(e))
            lines.append(repr(s))
            os.write(w, "\n".join(lines).encode())
            os.close(w)
            s.close()  # zo2_session_free, as the interpreter's exit would: releases nothing here
            os._exit(0 if s.closed else 3)  # (not sys.exit: this is pytest's process, forked)
        os.close(w)
        status = wait_for_child(pid)
        with os.fdopen(r) as f:
            report = f.read().splitlines()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert len(report) == 4
        for line in report[:3]:
            assert f"created in process {os.getpid()}" in line and "forked child" in line, line
            assert "create a new session in the child" in line.lower()
        assert report[3].startswith("<zo2.Session")
        assert s.step(ids).step == 1  # the parent's session is untouched


def test_non_utf8_paths(tiny, tmp_path):
    base = os.fsencode(tmp_path)
    missing = base + b"/missing_\xfe"
    for call in (lambda: zo2.Model.load(missing), lambda: zo2.Session(missing),
                 lambda: zo2.Tokenizer.from_dir(missing)):
        with pytest.raises(zo2.FileIOError) as e:
            call()
        assert "missing_\\xfe" in str(e.value)  # the message survives and names the path
    d = base + b"/mod_\xff"
    shutil.copytree(os.fsencode(tiny), d)
    m = zo2.Model.load(d)
    assert os.fsencode(m.path) == d and m.path == os.fsdecode(d)
    assert "mod_\\xff" in repr(m)
    with zo2.Session(m, max_seqs=2, max_seq_len=16) as s:
        assert os.fsencode(s.model_path) == d
        assert "mod_\\xff" in repr(s)
    log = base + b"/log_\xff.jsonl"
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, seed_log=log) as s:
        assert os.fsencode(s.params["seed_log"]) == log
    with zo2.Session(os.fsdecode(d), max_seqs=2, max_seq_len=16) as s:  # the str round trip
        assert os.fsencode(s.model_path) == d
    # A seed log of a model whose path is not UTF-8: its header names it with U+FFFD (it
    # failed with a JSON exception), and the base fingerprint still identifies the weights.
    with zo2.Session(d, max_seqs=2, max_seq_len=16, seed_log=base + b"/log2.jsonl") as s:
        s.step(batch(512))
    header = json.loads(open(base + b"/log2.jsonl", "rb").readline())
    assert "mod_\ufffd" in header["base_model"] and header["base_fingerprint"]


def test_big_endian_arrays_are_converted(tiny):
    ids = batch(512)
    labels = ids.copy()
    labels[:, :3] = -100
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    with zo2.Session(tiny, training=False, max_seqs=2, max_seq_len=16) as s:
        want = s.eval(ids, attention_mask=mask, labels=labels)
        got = s.eval(ids.astype(">i4"), attention_mask=mask.astype(">i4"), labels=labels.astype(">i4"))
        assert bits(got) == bits(want)
        assert bits(s.eval(ids.astype(">i8"))) == bits(s.eval(ids))
        with pytest.raises(zo2.InvalidArgumentError, match="token id 600"):
            s.eval(np.full((1, 4), 600, ">i4"))  # the value as written, not byte-swapped


def test_type_checks_name_the_argument(tiny, tune):
    from conftest import SOURCE
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16) as s:
        for bad in (True, "fast", None):
            with pytest.raises(zo2.InvalidTypeError, match="lr must be a number"):
                s.set_lr(bad)
        assert s.params["lr"] == pytest.approx(1e-6)
        s.set_lr(1)
        assert s.params["lr"] == 1.0
    with pytest.raises(zo2.InvalidArgumentError, match=r"adam_eps 1e\+60 is beyond float32"):
        zo2.Session(tiny, optimizer="zo-adam", adam_eps=1e60)
    with pytest.raises(zo2.InvalidArgumentError, match=r"beta1 1e\+40 is beyond float32"):
        zo2.Session(tiny, optimizer="zo-adam", beta1=1e40)
    tok = zo2.Tokenizer.from_dir(SOURCE / "data" / "gpt2")
    with pytest.raises(zo2.InvalidArgumentError, match="id 1099511627776 is not in the vocabulary"):
        tok.id_to_token(2 ** 40)
    with pytest.raises(zo2.InvalidTypeError, match="id must be an int"):
        tok.id_to_token("5")
    with pytest.raises(zo2.InvalidArgumentError, match="lone surrogate"):
        tok.encode("a\udcff")
    with pytest.raises(zo2.InvalidTypeError, match="text must be a str"):
        tok.encode(b"abc")
    with pytest.raises(zo2.InvalidTypeError, match="add_special_tokens must be a bool"):
        tok.encode("abc", add_special_tokens="yes")
    with pytest.raises(zo2.InvalidTypeError, match="token must be a str"):
        tok.token_to_id(5)
    with pytest.raises(zo2.InvalidTypeError, match="level must be a str"):
        zo2.set_log_level(5)
    assert issubclass(zo2.InvalidTypeError, TypeError)


def test_repr_and_closed_never_wait_for_a_running_call(tiny):
    import time
    ids = batch(512)
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        s.step(ids)
        t = threading.Thread(target=zo2._zo2._capi_step_loop, args=(s, ids, 400))  # holds the session's lock
        t.start()
        try:
            threading.Event().wait(0.05)
            start = time.perf_counter()
            for _ in range(20):
                text, closed = repr(s), s.closed
            took = time.perf_counter() - start
            running = t.is_alive()
        finally:
            t.join()
        assert running, "the step loop ended too soon to test anything"
        assert took < 0.05 and not closed and "next step 1" in text
        s.step(ids)
        assert f"next step {s.step_index}" in repr(s)
    assert s.closed and "(closed)" in repr(s)


def test_ctrl_c_during_save_says_the_save_completed(tiny, tmp_path):
    import random
    import time
    rng = random.Random(0)
    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        s.step(batch(512))
        start = time.perf_counter()
        s.save(tmp_path / "timing")
        took = time.perf_counter() - start
        for attempt in range(200):
            out = tmp_path / f"run{attempt}"
            t = threading.Timer(rng.uniform(0, took), os.kill, (os.getpid(), signal.SIGINT))
            try:
                t.start()
                s.save(out)
                t.join()
                for _ in range(1000):
                    pass  # a KeyboardInterrupt that came after save() raises here, without the note
            except KeyboardInterrupt as e:
                t.join()
                if str(e):
                    assert "completed before the interrupt" in str(e) and str(out) in str(e)
                    assert (out / "config.json").exists() and (out / "zo2_state.json").exists()
                    break
        else:
            pytest.fail("no Ctrl-C arrived during a save in 200 tries")
        s.step(batch(512))  # still usable


def test_c_api_refuses_a_forked_child_and_its_free_returns(tiny):
    # The C API's own check (zo2.h, "fork()"), through ctypes: every call on an inherited
    # session fails in the child, and zo2_session_free returns there without waiting.
    import ctypes
    import glob
    here = os.path.dirname(zo2._zo2.__file__)
    libs = sorted(glob.glob(os.path.join(here, "libzo2.so*")) + glob.glob(os.path.join(here, "..", "..", "libzo2.so*")))
    if not libs:
        pytest.skip("libzo2.so not found beside the module")
    lib = ctypes.CDLL(libs[0])
    lib.zo2_last_error.restype = ctypes.c_char_p
    lib.zo2_session_step_index.restype = ctypes.c_int64
    model, session = ctypes.c_void_p(), ctypes.c_void_p()
    assert lib.zo2_model_load(os.fsencode(tiny), None, ctypes.byref(model)) == 0
    assert lib.zo2_session_init(model, None, ctypes.byref(session)) == 0, lib.zo2_last_error()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        index = lib.zo2_session_step_index(session)
        os.write(w, b"%d %s" % (index, lib.zo2_last_error()))
        plan = ctypes.create_string_buffer(4096)
        rc = lib.zo2_session_plan(session, plan)
        lib.zo2_session_free(session)  # would wait forever for the parent's threads
        lib.zo2_model_free(model)
        os._exit(0 if rc == -1 else 3)
    os.close(w)
    status = wait_for_child(pid)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert report.startswith("-1 zo2_session_step_index: the session was created in process")
    assert "forked child" in report and "create a new session in the child" in report
    assert lib.zo2_session_step_index(session) == 0  # the parent's is fine
    lib.zo2_session_free(session)
    lib.zo2_model_free(model)


def test_a_second_writer_of_a_live_seed_log_is_refused(tiny, tmp_path):
    """Note [One writer per seed log] (adversarial pass 60): a session resuming a run's earlier
    checkpoint into the log the run was still writing cut the run's later steps off, and the
    run's checkpoints past that step could no longer be resumed or replayed. Now the second
    writer, in this process or another, is refused before it reads or changes the log."""
    ids = batch(512)
    kw = dict(lr=1e-3, max_seqs=2, max_seq_len=16)
    log = tmp_path / "a.jsonl"
    with zo2.Session(tiny, seed_log=log, **kw) as a:
        for _ in range(3):
            a.step(ids)
        a.save(tmp_path / "s3")
        for _ in range(3):
            a.step(ids)
        before = log.read_bytes()
        with pytest.raises(zo2.FileIOError, match=r"another session of this process is writing this seed log.*"
                                                  r"Session\.close\(\)"):
            zo2.Session(tmp_path / "s3", seed_log=log, seed_log_append=True, first_step=3, **kw)
        code = ("import sys, zo2\n"
                "try:\n"
                f"    zo2.Session({str(tmp_path / 's3')!r}, seed_log={str(log)!r}, seed_log_append=True, first_step=3,"
                " lr=1e-3, max_seqs=2, max_seq_len=16)\n"
                "except zo2.FileIOError as e:\n"
                "    print(e); sys.exit(0 if 'is writing this seed log' in str(e) else 3)\n"
                "sys.exit(1)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
        assert r.returncode == 0, r.stdout + r.stderr
        assert log.read_bytes() == before
        a.step(ids)  # the live run goes on
        a.save(tmp_path / "s7")
    # Closed, the log may be continued (a resume cuts it back to its step).
    with zo2.Session(tmp_path / "s3", seed_log=log, seed_log_append=True, first_step=3, **kw) as b:
        b.step(ids)
    assert len(log.read_text().splitlines()) == 1 + 4


def test_keywords_without_the_keyword_that_gives_them_a_meaning_are_refused(tiny, tmp_path):
    """The combination checks zo2-tune's flags have (api/options.h), through the C API (pass 69, F1-F4)."""
    model = zo2.Model.load(tiny)
    ids = batch(model.n_vocab, n_seq=2, n_tokens=16)
    cap = dict(lr=1e-3, max_seqs=2, max_seq_len=16, n_threads=2)
    for name, kw in (("lora", dict(lora_r=2)), ("prefix", dict(prefix_tokens=2))):
        with zo2.Session(model, **cap, **kw) as s:
            s.step(ids)
            s.save(str(tmp_path / name))
    refused = [
        (dict(adapter=str(tmp_path / "prefix"), lora_r=2), "lora_r ask for LoRA r 2"),
        (dict(adapter=str(tmp_path / "lora"), prefix_tokens=3), "prefix_tokens 3 with adapter_path"),
        (dict(adapter=str(tmp_path / "lora"), lora_r=4, lora_alpha=1.0, lora_targets="fc1"), "ask for LoRA r 4"),
        (dict(lora_alpha=4.0), "lora_alpha 4: LoRA's"),
        (dict(lora_targets="fc1"), "lora_targets 'fc1': LoRA's"),
        (dict(prefix_tokens=2, lora_alpha=4.0), "choose one kind of adapter"),
        (dict(prefix_tokens=2, lora_targets="fc1,fc2"), "choose one kind of adapter"),
        (dict(lora_r=2, save_dtype="bf16"), "save_dtype bf16: an adapter run"),
        (dict(prefix_tokens=2, save_dtype="bf16"), "save_dtype bf16: an adapter run"),
        (dict(disk_lag=4), "disk_lag 4 is for the disk tier"),
        (dict(disk_staging=4), "disk_staging 4 is for the disk tier"),
        (dict(seed_log_append=True), "seed_log_append is set"),
        (dict(kv_cache="host"), "kv_cache host"),
        (dict(prefill_chunk=8), "prefill_chunk 8"),
    ]
    for kw, words in refused:
        with pytest.raises(zo2.InvalidArgumentError, match=words.replace("(", r"\(")):
            zo2.Session(model, **cap, **kw)
    # The adapter's own shape given again, and LoRA's fields with LoRA, are taken.
    with zo2.Session(model, **cap, adapter=str(tmp_path / "lora"), lora_r=2):
        pass
    with zo2.Session(model, **cap, lora_r=2, lora_alpha=4.0, lora_targets="fc1"):
        pass


# Adversarial pass 70, finding 1: Session(model) and zo2.plan(model) pass the model's handle
# to the C API with the GIL released; a Model.close() on another thread meanwhile freed it
# under zo2_session_init / zo2_plan (a use after free: "basic_string::_M_create", a
# FormatError about a changed config.json, or a crash). With a huge switch interval the
# opening thread keeps the GIL until it releases it inside the call, so the main thread's
# close() lands exactly there, every round; MALLOC_PERTURB_ makes freed memory garbage, so a
# read of it fails instead of passing by luck. The model now lives until the call returns.
def test_model_close_while_a_session_or_plan_opens_from_it_on_another_thread(tiny):
    code = f"""
import sys, threading, numpy as np, zo2
ids = (np.arange(32).reshape(2, 16) * 7 + 3) % 512
with zo2.Session({str(tiny)!r}, max_seqs=2, max_seq_len=16, training=False) as s:
    expected = s.eval(ids)
sys.setswitchinterval(1000)
for what in ("session", "plan"):
    for round in range(25):
        m = zo2.Model.load({str(tiny)!r})
        got = []
        def open_one():
            try:
                if what == "session":
                    got.append(zo2.Session(m, max_seqs=2, max_seq_len=16, training=False))
                else:
                    got.append(zo2.plan(m, max_seqs=2, max_seq_len=16))
            except Exception as e:
                got.append(e)
        t = threading.Thread(target=open_one)
        t.start()  # returns once open_one released the GIL: inside the C API's call
        m.close()
        t.join()
        r = got[0]
        assert not isinstance(r, Exception), (what, round, repr(r))
        if what == "session":
            with r:
                assert r.eval(ids) == expected
        else:
            assert r.n_blocks == 2
        assert m.closed
        try:
            zo2.Session(m, max_seqs=2, max_seq_len=16)
            raise AssertionError("a closed model opened a session")
        except zo2.InvalidArgumentError as e:
            assert "the model is closed" in str(e)
print("ok")
"""
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, MALLOC_PERTURB_="165"), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", f"rc {r.returncode}: {r.stdout}{r.stderr}"


# Finding 3: any real number for a float keyword, as the int keywords take numpy's integers.
def test_float_keywords_take_any_real_number(tiny):
    import decimal
    import fractions

    with zo2.Session(tiny, lr=np.float32(1e-3), eps=np.float64(1e-3), weight_decay=np.int64(0),
                     max_seqs=2, max_seq_len=16, rank_timeout=np.float16(60)) as s:
        assert s.params["lr"] == float(np.float32(1e-3)) and s.params["weight_decay"] == 0.0
        assert s.params["rank_timeout"] == 60.0
        for v in (np.float32(5e-4), np.float64(5e-4), fractions.Fraction(1, 2000), decimal.Decimal("0.0005"),
                  np.int8(1)):
            s.set_lr(v)
            assert s.params["lr"] == float(np.float32(float(v)))
        ids = batch(512)
        s.step(ids)
        for bad in (True, np.bool_(False), "1e-3", b"1", 1 + 2j, np.complex128(1e-3), np.array([1e-3]), None, [1e-3]):
            with pytest.raises(zo2.InvalidTypeError, match="lr must be a number"):
                s.set_lr(bad)
        with pytest.raises(zo2.InvalidArgumentError, match="out of range"):
            s.set_lr(2**2000)
    for name in ("momentum",):
        with zo2.Session(tiny, max_seqs=2, max_seq_len=16, optimizer="zo-sgd-momentum", **{name: np.float32(0.5)}) as s:
            assert s.params[name] == 0.5
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, optimizer="zo-adam", beta1=np.float64(0.8),
                     beta2=np.float32(0.99), adam_eps=np.float64(1e-6)) as s:
        assert s.params["beta1"] == float(np.float32(0.8)) and s.params["adam_eps"] == float(np.float32(1e-6))
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, lora_r=2, lora_alpha=np.int32(8)) as s:
        assert s.params["lora_alpha"] == 8.0
    with pytest.raises(zo2.InvalidArgumentError, match="lr"):
        zo2.Session(tiny, max_seqs=2, max_seq_len=16, lr=np.float64(-1))
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, training=False, generate_seqs=1) as s:
        g = s.generate([[1, 2, 3]], max_new_tokens=2, greedy=False, temperature=np.float32(0.7), top_p=np.float64(0.9))
        assert len(g[0].tokens) == 2


# Finding 7: .params reports the paths the session uses, absolute as Model.path is, so a
# later os.chdir does not make them name other files (Session(**s.params) opens the same ones).
def test_params_paths_are_absolute_after_a_chdir(tiny, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, seed_log="./sl.jsonl", host_mem="8M", disk_dir="disk") as s:
        s.step(batch(512))
        monkeypatch.chdir(tmp_path / "sub")
        p = s.params
        assert p["seed_log"] == str(tmp_path / "sl.jsonl") and os.path.isfile(p["seed_log"])
        assert p["disk_dir"] == str(tmp_path / "disk")
        s.save(tmp_path / "lora0")
    monkeypatch.chdir(tmp_path)
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, lora_r=2) as s:
        s.save("lora")
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, adapter="lora", lora_r=2) as s:
        monkeypatch.chdir(tmp_path / "sub")
        assert s.params["adapter"] == str(tmp_path / "lora")
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, seed_log=os.fsencode(tmp_path / "b.jsonl")) as s:
        assert s.params["seed_log"] == str(tmp_path / "b.jsonl")


# Finding 8: what was passed, in each message.
def test_batch_messages_name_what_was_passed(tiny):
    with zo2.Session(tiny, max_seqs=4, max_seq_len=16, training=False) as s:
        ids = batch(512)
        for bad, words in ((None, "input_ids: None is not an array of integers"),
                           ((i for i in range(4)), "input_ids: a generator is not an array of integers"),
                           ({"a": 1}, "input_ids: a dict is not an array of integers"),
                           ([[1, 2], [3]], "input_ids: a list is not an array of integers"),
                           (np.array([1, 2], dtype=object), "input_ids has dtype object"),
                           (b"\x01\x02", "input_ids is a bytes, not an array of integers"),
                           (bytearray(b"\x01\x02"), "input_ids is a bytearray, not an array of integers")):
            with pytest.raises(zo2.InvalidTypeError, match=re.escape(words)):
                s.eval(bad)
        with pytest.raises(zo2.InvalidArgumentError, match=r"attention_mask has shape \[16\] but input_ids has \[2, 16\]"):
            s.eval(ids, attention_mask=np.ones(16, np.int32))
        with pytest.raises(zo2.InvalidArgumentError, match=r"labels has shape \[1, 8\] but input_ids has \[16\]"):
            s.eval(ids[0], labels=ids[:1, :8])
        from conftest import SOURCE
        with pytest.raises(zo2.InvalidTypeError, match="ids is a bytearray"):
            zo2.Tokenizer.from_dir(SOURCE / "data" / "gpt2").decode(bytearray(b"\x01"))
        choices = batch(512, 4, 16)
        labels = np.full_like(choices, -100)
        labels[:, -2:] = choices[:, -2:]
        for sizes, words, cls in (
                (4, "group_sizes has 0 dimensions; expected [n_groups]", zo2.InvalidArgumentError),
                ([2.0, 2.0], "group_sizes has dtype float64: group sizes are integers", zo2.InvalidTypeError),
                ([[2, 2]], "group_sizes must be one-dimensional ([n_groups]), not of shape [1, 2]",
                 zo2.InvalidArgumentError),
                (None, "group_sizes: None is not an array of integers", zo2.InvalidTypeError)):
            with pytest.raises(cls, match=re.escape(words)):
                s.eval_choices(choices, group_sizes=sizes, group_labels=[0, 1], labels=labels)
        with pytest.raises(zo2.InvalidArgumentError, match=r"group_labels must be one-dimensional"):
            s.eval_choices(choices, group_sizes=[2, 2], group_labels=[[0, 1]], labels=labels)
        s.eval_choices(choices, group_sizes=np.array([2, 2]), group_labels=(0, 1), labels=labels)


def test_tile_refuses_a_negative_size(tiny):
    for bad in (-1, -4096, np.int64(-1)):
        with pytest.raises(zo2.InvalidArgumentError, match='tile -[0-9]+ is negative: tile takes "auto", "off"'):
            zo2.Session(tiny, max_seqs=2, max_seq_len=16, tile=bad)
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, tile="off") as s:
        assert s.params["tile"] == "off"
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, tile=0) as s:
        assert s.params["tile"] == "auto"


# Finding 9: StepResult pickles and copies (a multiprocessing worker returns it), as the
# dataclass results do; Model and Session still refuse with a TypeError.
def test_step_result_pickles_and_copies(tiny):
    import copy
    import pickle

    with zo2.Session(tiny, lr=1e-3, max_seqs=2, max_seq_len=16) as s:
        s.step(batch(512))
        r = s.step(batch(512, seed=1))
        fields = ("loss_plus", "loss_minus", "projected_grad", "step", "loss")
        copies = [pickle.loads(pickle.dumps(r, protocol=p)) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
        copies += [copy.copy(r), copy.deepcopy(r), zo2.StepResult(**{f: getattr(r, f) for f in fields})]
        for other in copies:
            assert type(other) is zo2.StepResult and other is not r
            assert [getattr(other, f) for f in fields] == [getattr(r, f) for f in fields]
            assert repr(other) == repr(r) and other.step == 1
        for obj in (s, zo2.Model.load(tiny)):
            with pytest.raises(TypeError):
                pickle.dumps(obj)
