"""Update rules from Python (README "Update rules"): the session keywords optimizer,
directions, difference, beta1, beta2, adam_eps, state_dtype, resume_state train, round-trip
through Session.params, and zo2.train passes --optimizer on to zo2-tune's train."""
import json

import numpy as np
import pytest

import zo2


def batch(vocab, n_seq=2, n_tokens=16, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (n_seq, n_tokens)).astype(np.int32)


def bits(x):
    return int(np.float32(x).view(np.uint32))


ADAM = dict(optimizer="zo-adam", state_dtype="bf16", lr=1e-3, beta1=0.8, beta2=0.99, adam_eps=1e-6, seed=5,
            max_seqs=2, max_seq_len=16)


def test_adam_trains_saves_its_state_and_resumes_exactly(tiny, tmp_path):
    ids = batch(512)
    with zo2.Session(tiny, **ADAM) as s:
        p = s.params
        assert p["optimizer"] == "zo-adam" and p["state_dtype"] == "bf16"
        assert p["beta1"] == float(np.float32(0.8)) and p["beta2"] == float(np.float32(0.99))
        assert p["adam_eps"] == float(np.float32(1e-6)) and p["lr"] == float(np.float32(1e-3))
        assert p["directions"] == 1 and p["difference"] == "central" and p["resume_state"] is False
        before = s.eval(ids)
        for i in range(4):
            r = s.step(ids)
            assert r.step == i
            assert np.isfinite([r.loss_plus, r.loss_minus, r.projected_grad]).all()
            assert r.loss_plus != r.loss_minus
        after = s.eval(ids)
        assert np.isfinite(after) and after != before  # the state-driven updates moved the weights
        s.save(tmp_path / "run")
        assert (tmp_path / "run" / "current" / "optimizer_state.safetensors").is_file()
        s.step(ids)
        continued = s.eval(ids)
    # The saved weights and Adam state, opened with resume_state at step 4: the fifth step
    # lands on the same weights bit for bit.
    with zo2.Session(tmp_path / "run", resume_state=True, first_step=4, **ADAM) as s2:
        assert s2.params["resume_state"] is True and s2.step_index == 4
        s2.step(ids)
        assert bits(s2.eval(ids)) == bits(continued)
    # The state is the saved step's: at another first_step it would go with other weights.
    with pytest.raises(zo2.InvalidArgumentError, match="first_step 5: .* saved at step 4; a resume .resume_state"):
        zo2.Session(tmp_path / "run", resume_state=True, first_step=5, **ADAM)
    # Without the state the same request is refused, naming the file.
    with pytest.raises(zo2.FormatError, match="optimizer_state.safetensors"):
        zo2.Session(tiny, resume_state=True, **ADAM)


def test_forward_difference_with_two_directions(tiny):
    ids = batch(512, seed=1)
    kw = dict(directions=2, difference="forward", lr=1e-3, eps=1e-3, max_seqs=2, max_seq_len=16)
    with zo2.Session(tiny, **kw) as s:
        p = s.params
        assert p["directions"] == 2 and p["difference"] == "forward" and p["optimizer"] == "zo-sgd"
        unperturbed = s.eval(ids)
        r = s.step(ids)
        # Forward difference: loss_minus is L(θ) itself and g_0 = (L(θ + eps·z_0) − L(θ)) / eps.
        assert r.loss_minus == pytest.approx(unperturbed, rel=1e-6)
        assert r.projected_grad == pytest.approx((r.loss_plus - r.loss_minus) / 1e-3, rel=1e-2, abs=1e-3)
        assert r.loss == r.loss_minus  # the reported loss is L(θ), not ½(L(θ + eps·z) + L(θ))
        for _ in range(3):
            r = s.step(ids)
            assert np.isfinite([r.loss_plus, r.loss_minus, r.projected_grad]).all()
        assert np.isfinite(s.eval(ids)) and s.eval(ids) != unperturbed
        assert s.step_index == 4
        assert s.params == p  # stepping changes no parameter


@pytest.mark.parametrize("rule", [dict(optimizer="zo-sgd-sign", lr=1e-4), dict(optimizer="zo-sgd-cons"),
                                  dict(optimizer="zo-sgd-momentum", momentum=0.5, state_dtype="fp8")],
                         ids=["sign", "cons", "momentum-fp8"])
def test_the_other_rules_step(tiny, rule):
    ids = batch(512, seed=2)
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16, **{"lr": 1e-3, **rule}) as s:
        for k, v in rule.items():
            assert s.params[k] == (float(np.float32(v)) if isinstance(v, float) else v), k
        for _ in range(3):
            r = s.step(ids)
            assert np.isfinite([r.loss_plus, r.loss_minus, r.projected_grad]).all()
        assert np.isfinite(s.eval(ids))


RULE_ERRORS = [
    (dict(optimizer="zo-lbfgs"), zo2.InvalidArgumentError, "optimizer 'zo-lbfgs'"),
    (dict(directions=0), zo2.InvalidArgumentError, "directions 0"),
    (dict(directions=65), zo2.InvalidArgumentError, "directions 65"),
    (dict(difference="sideways"), zo2.InvalidArgumentError, "difference 'sideways'"),
    (dict(optimizer="zo-sgd-cons", weight_decay=0.1), zo2.InvalidArgumentError, "weight_decay 0.1"),
    (dict(optimizer="zo-sgd-cons", directions=2), zo2.InvalidArgumentError, "directions"),
    (dict(optimizer="zo-adam", beta2=1.0), zo2.InvalidArgumentError, "beta2 1"),
    (dict(optimizer="zo-adam", state_dtype="fp16"), zo2.UnsupportedError, "state_dtype 'fp16'"),
    (dict(optimizer="zo-adam", state_dtype="fp5"), zo2.InvalidArgumentError, "state_dtype 'fp5'"),
    # A rule's keyword for a rule without it is refused, not ignored (as zo2-tune's flags).
    (dict(beta2=5.0), zo2.InvalidArgumentError, "beta2 applies to optimizer zo-adam, not 'zo-sgd'"),
    (dict(optimizer="zo-sgd-sign", state_dtype="bf16"), zo2.InvalidArgumentError, "state_dtype applies to"),
    (dict(optimizer="zo-sgd-momentum", beta1=0.5), zo2.InvalidArgumentError,
     "beta1 does not apply to optimizer 'zo-sgd-momentum'"),
    (dict(optimizer="zo-adam", momentum=0.5), zo2.InvalidArgumentError, "momentum does not apply to optimizer 'zo-adam'"),
]


@pytest.mark.parametrize("kw,cls,message", RULE_ERRORS, ids=[repr(e[0]) for e in RULE_ERRORS])
def test_rule_errors(tiny, kw, cls, message):
    with pytest.raises(cls) as e:
        zo2.Session(tiny, **{"max_seqs": 2, "max_seq_len": 16, **kw})
    assert message in str(e.value)


def test_train_with_adam_writes_the_rule_and_its_state(tiny, synth, tmp_path):
    r = zo2.train(tiny, data=synth, out=tmp_path / "adam", steps=4, batch_size=4, lr=1e-3, optimizer="zo-adam",
                  state_dtype="bf16", directions=2, progress=False)
    assert len(r.steps) == 4 and np.isfinite(r.final_loss)
    assert (tmp_path / "adam" / "current" / "optimizer_state.safetensors").is_file()
    lines = [json.loads(line) for line in (tmp_path / "adam" / "seed_log.jsonl").read_text().splitlines()]
    header, steps = lines[0], lines[1:]
    assert header["optimizer"]["name"] == "zo-adam" and header["optimizer"]["directions"] == 2
    assert header["optimizer"]["state_dtype"] == "bf16"
    assert len(steps) == 4 and all(len(s["gs"]) == 2 for s in steps)


def test_a_log_that_starts_past_step_zero_replays_from_its_checkpoint_and_state(tiny, tune, tmp_path):
    """A session that resumes (resume_state, first_step 3) into a new seed log: replay starts
    from the checkpoint at step 3 and its Adam state, bit for bit; the step-0 base and a
    checkpoint at another step are refused (they used to replay silently with a zero state)."""
    import subprocess
    ids = batch(512, n_seq=2, seed=3)
    with zo2.Session(tiny, seed_log=tmp_path / "a.jsonl", **ADAM) as s:
        for _ in range(3):
            s.step(ids)
        s.save(tmp_path / "s3")
        s.step(ids)
        s.save(tmp_path / "s4")
    with zo2.Session(tmp_path / "s3", seed_log=tmp_path / "b.jsonl", resume_state=True, first_step=3, **ADAM) as s:
        for _ in range(3):
            s.step(ids)
        s.save(tmp_path / "s6")

    def replay(model, out):
        return subprocess.run([str(tune), "-q", "replay", "--model", str(model), "--seed-log", str(tmp_path / "b.jsonl"),
                               "--out", str(tmp_path / out)], capture_output=True, text=True)

    r = replay(tmp_path / "s3", "r6")
    assert r.returncode == 0, r.stderr
    for f in ("model.safetensors", "optimizer_state.safetensors"):
        assert (tmp_path / "r6" / "current" / f).read_bytes() == (tmp_path / "s6" / "current" / f).read_bytes(), f
    r = subprocess.run([str(tune), "-q", "replay", "--model", str(tmp_path / "s3"), "--seed-log",
                        str(tmp_path / "b.jsonl"), "--until-step", "2", "--out", str(tmp_path / "r2")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "starts at step 3" in r.stderr, r.stderr
    r = replay(tiny, "r6-base")
    assert r.returncode == 2 and "not those the seed log's run started from" in r.stderr, r.stderr
    r = replay(tmp_path / "s4", "r6-s4")
    assert r.returncode == 2 and "is at step 4, but" in r.stderr and "starts at step 3" in r.stderr, r.stderr


def test_cli_resume_of_a_session_run_continues_the_sessions_seed_log(tiny, synth, tune, tmp_path):
    """train --resume of a run a session saved (its seed log outside the run directory): the
    run directory's log starts as the session's, so replay from the base rebuilds the end (it
    used to start a new log at the resume step, with no base, that replayed onto anything)."""
    import subprocess
    ids = batch(512, n_seq=4, seed=4)
    kw = dict(ADAM, max_seqs=4)
    with zo2.Session(tiny, seed_log=tmp_path / "session.jsonl", **kw) as s:
        for _ in range(2):
            s.step(ids)
        s.save(tmp_path / "run")
    r = subprocess.run([str(tune), "-q", "train", "--resume", str(tmp_path / "run"), "--out", str(tmp_path / "run"),
                        "--data", str(synth), "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--eps", "1e-3",
                        "--weight-decay", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "run" / "seed_log.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["first_step"] == 0 and header["base_fingerprint"] and len(lines) == 5
    assert lines[:3] == (tmp_path / "session.jsonl").read_text().splitlines()
    r = subprocess.run([str(tune), "-q", "replay", "--model", str(tiny), "--seed-log",
                        str(tmp_path / "run" / "seed_log.jsonl"), "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for f in ("model.safetensors", "optimizer_state.safetensors"):
        assert (tmp_path / "rep" / "current" / f).read_bytes() == (tmp_path / "run" / "current" / f).read_bytes(), f
