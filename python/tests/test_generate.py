"""Session.generate / generate_text (zo2_generate): greedy equals the argmax of the model's
log-probabilities fed back, sampling repeats for a seed, stop ids, refusals with the C API's
messages, and generate_text against zo2-tune generate."""
import json
import subprocess

import numpy as np
import pytest

import zo2
from conftest import SOURCE

PROMPTS = [[1, 7, 9, 11, 3], [1, 40]]


def gen_session(model, **kw):
    return zo2.Session(model, **{"training": False, "max_seqs": 2, "max_seq_len": 16, "generate_seqs": 2, **kw})


def argmax_fed_back(session, prompt, n, vocab):
    """The greedy continuation of prompt by token_logprobs: every candidate id scored after
    the tokens so far (one sequence per candidate), the best (first of equal) taken."""
    seq = list(prompt)
    for _ in range(n):
        cand = np.empty((vocab, len(seq) + 1), np.int32)
        cand[:, :-1] = seq
        cand[:, -1] = np.arange(vocab)
        lp = session.token_logprobs(cand)[:, len(seq) - 1]
        seq.append(int(np.argmax(lp)))
    return seq[len(prompt):]


@pytest.mark.parametrize("kv_cache", ["host", "device", "off"])
def test_greedy_equals_the_argmax_fed_back(tiny, kv_cache):
    model = zo2.Model.load(tiny)
    with gen_session(model, kv_cache=kv_cache) as g:
        assert g.params["generate_seqs"] == 2 and g.params["kv_cache"] == kv_cache
        out = g.generate(PROMPTS, max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(r, zo2.Generation) for r in out)
    assert [len(r.tokens) for r in out] == [4, 4] and not any(r.stopped for r in out)
    assert all(r.text is None for r in out)
    with zo2.Session(model, training=False, max_seqs=model.n_vocab, max_seq_len=16) as e:
        for prompt, r in zip(PROMPTS, out):
            assert r.tokens == argmax_fed_back(e, prompt, 4, model.n_vocab)


def test_prompt_layouts_and_batches(tiny):
    with gen_session(tiny, generate_seqs=1, max_seqs=1) as one, gen_session(tiny) as two:
        ref = two.generate(PROMPTS, max_new_tokens=5)
        # Tuples, numpy rows, int64: the same prompts; one at a time gives the same tokens.
        assert two.generate(tuple(tuple(p) for p in PROMPTS), max_new_tokens=5) == ref
        assert two.generate([np.asarray(p, np.int64) for p in PROMPTS], max_new_tokens=5) == ref
        assert one.generate(PROMPTS, max_new_tokens=5) == ref
        # Three prompts through a batch of two: the third runs in a second batch.
        third = two.generate(PROMPTS + [PROMPTS[0]], max_new_tokens=5)
        assert third[:2] == ref and third[2] == ref[0]
        rows = np.asarray([[1, 7, 9], [1, 40, 41]], np.int32)
        assert two.generate(rows, max_new_tokens=3) == two.generate(rows.tolist(), max_new_tokens=3)


def test_sampling_repeats_for_a_seed(tiny):
    with gen_session(tiny) as g:
        kw = dict(max_new_tokens=8, greedy=False, temperature=0.8, top_p=0.95)
        a = g.generate(PROMPTS, seed=3, **kw)
        assert g.generate(PROMPTS, seed=3, **kw) == a
        others = [g.generate(PROMPTS, seed=s, **kw) for s in (4, 5)]
        assert any(o != a for o in others)
        assert g.generate(PROMPTS, seed=2**64 - 1, **kw) == g.generate(PROMPTS, seed=2**64 - 1, **kw)
        # A tiny nucleus keeps only the most likely token: greedy.
        assert g.generate(PROMPTS, max_new_tokens=8, greedy=False, top_p=1e-6, seed=9) == \
            g.generate(PROMPTS, max_new_tokens=8)


def test_stop_ids_end_a_prompt(tiny):
    with gen_session(tiny) as g:
        ref = g.generate(PROMPTS, max_new_tokens=4)
        stop = ref[0].tokens[1]
        out = g.generate(PROMPTS, max_new_tokens=4, stop_ids=[stop])
        assert out[0].stopped and len(out[0].tokens) <= 2 and out[0].tokens[-1] == stop
        assert out[0].tokens == ref[0].tokens[:len(out[0].tokens)]
        for r, full in zip(out, ref):  # each prompt: its tokens up to and including its first stop id
            cut = full.tokens.index(stop) + 1 if stop in full.tokens else len(full.tokens)
            assert r.tokens == full.tokens[:cut] and r.stopped == (stop in full.tokens)
        assert g.generate(PROMPTS, max_new_tokens=4, stop_ids=np.asarray([stop], np.int64)) == out
        assert g.generate(PROMPTS, max_new_tokens=4, stop_ids=[]) == ref


GENERATE_ERRORS = [
    (dict(prompts=[[1, 7], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 7], [1, 512]]), "prompt 1, token 1: id 512 is outside the vocabulary"),
    (dict(prompts=[[1, 7, 9, 11, 3]], max_new_tokens=15), "prompt 0 has 5 tokens"),
    (dict(max_new_tokens=0), "max_new_tokens 0"),
    (dict(max_new_tokens=10**6), "prompt 0 has 5 tokens"),
    (dict(greedy=False, temperature=0.0), "temperature 0"),
    (dict(greedy=False, temperature=-1.0), "temperature -1"),
    (dict(greedy=False, temperature=1e39), "temperature 1e+39"),
    (dict(greedy=False, top_p=1.5), "top_p 1.5"),
    (dict(pad_id=-1), "pad id -1"),
    (dict(prompts=[]), "n_prompts must be at least 1"),
    (dict(prompts=[1, 2, 3]), "prompts[0] is an int"),
    (dict(prompts="hello"), "prompts must be a sequence"),
    (dict(prompts=[[1.5, 2.0]]), "prompts[0] has dtype float64"),
    (dict(greedy=1), "greedy must be a bool"),
    (dict(seed=-1), "seed -1"),
    (dict(stop_ids=[2**40]), "stop_ids holds"),
    (dict(stop_ids=[2, 512]), "stop id 512 (entry 1) is outside the vocabulary [0, 512)"),
    (dict(stop_ids=[-3]), "stop id -3"),
]


@pytest.mark.parametrize("kw,message", GENERATE_ERRORS, ids=[repr(e[0]) for e in GENERATE_ERRORS])
def test_generate_errors(tiny, kw, message):
    with gen_session(tiny) as g:
        ref = g.generate(PROMPTS, max_new_tokens=3)
        kw = {"prompts": PROMPTS, "max_new_tokens": 3, **kw}
        with pytest.raises(zo2.InvalidArgumentError) as e:
            g.generate(**kw)
        assert message in str(e.value)
        assert g.generate(PROMPTS, max_new_tokens=3) == ref  # refused before anything ran
        # Greedy ignores the sampling options, as the C API does.
        assert g.generate(PROMPTS, max_new_tokens=3, temperature=0.0, top_p=7.0) == ref


def test_sessions_without_generation(tiny):
    with zo2.Session(tiny, max_seqs=2, max_seq_len=16) as s:  # a training session, no generate_seqs
        with pytest.raises(zo2.InvalidArgumentError, match="not set up for generation"):
            s.generate(PROMPTS, max_new_tokens=3)
    with zo2.Session(tiny, training=False, max_seqs=2, max_seq_len=16) as s:  # generate_seqs = 0
        with pytest.raises(zo2.InvalidArgumentError, match="not set up for generation"):
            s.generate(PROMPTS, max_new_tokens=3)
    for kw, message in [(dict(training=False, generate_seqs=3), "generate_seqs 3: must be in [0, max_seqs = 2]"),
                        (dict(training=False, generate_seqs=1, kv_cache="gpu"), "kv_cache 'gpu'"),
                        (dict(training=False, generate_seqs=1, prefill_chunk=-1), "prefill_chunk -1"),
                        (dict(kv_cache=1), "kv_cache must be a str")]:
        with pytest.raises(zo2.InvalidArgumentError) as e:
            zo2.Session(tiny, max_seqs=2, max_seq_len=16, **kw)
        assert message in str(e.value)
    s = gen_session(tiny)
    s.close()
    with pytest.raises(zo2.InvalidArgumentError, match="the session is closed"):
        s.generate(PROMPTS)


def test_a_training_session_generates_with_its_current_weights(tiny, tmp_path):
    with zo2.Session(tiny, lr=1e-2, max_seqs=2, max_seq_len=16, generate_seqs=2) as t, gen_session(tiny) as g:
        assert t.generate(PROMPTS, max_new_tokens=4) == g.generate(PROMPTS, max_new_tokens=4)
        t.step(np.asarray([[1, 7, 9, 11, 3, 5, 6, 8]] * 2, np.int32))
        after = t.generate(PROMPTS, max_new_tokens=4)  # the pending update applied first
        t.save(tmp_path / "tuned")
        with gen_session(tmp_path / "tuned") as tuned:
            assert tuned.generate(PROMPTS, max_new_tokens=4) == after
        assert t.step_index == 1


def test_plan_with_generation(tiny):
    host = zo2.plan(tiny, training=False, max_seqs=2, max_seq_len=16, generate_seqs=2, kv_cache="host")
    base = zo2.plan(tiny, training=False, max_seqs=2, max_seq_len=16)
    assert host.host_bytes > base.host_bytes  # the KV caches live on the host


def test_prefill_chunk_gives_the_same_tokens(tiny):
    with gen_session(tiny) as whole, gen_session(tiny, prefill_chunk=2) as pieces:
        assert pieces.params["prefill_chunk"] == 2
        assert pieces.generate(PROMPTS, max_new_tokens=4) == whole.generate(PROMPTS, max_new_tokens=4)


# generate_text: zo2-tune generate's text handling, on opt-micro with the GPT-2 tokenizer.

@pytest.fixture(scope="module")
def micro(tmp_path_factory, tune):
    out = tmp_path_factory.mktemp("models") / "micro"
    subprocess.run([str(tune), "-q", "init", "--preset", "opt-micro", "--tokenizer", str(SOURCE / "data" / "gpt2"),
                    "--seed", "3", "--out", str(out)], check=True)
    return out


def cli_generate(tune, model, texts, *args):
    cmd = [str(tune), "generate", "--model", str(model), "--json", "-q", "--batch-size", "2", *args]
    for t in texts:
        cmd += ["--prompt", t]
    lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_generate_text_equals_zo2_tune_generate(micro, tune):
    tok = zo2.Tokenizer.from_dir(micro)
    texts = ["The film was", "I did not expect the ending to"]
    with zo2.Session(micro, training=False, max_seqs=2, max_seq_len=64, generate_seqs=2) as g:
        got = g.generate_text(tok, texts, max_new_tokens=8)
        ref = cli_generate(tune, micro, texts, "--max-new-tokens", "8")
        assert [r.tokens for r in got] == [r["tokens"] for r in ref]
        assert [r.stopped for r in got] == [r["stopped"] for r in ref]
        assert [r.text for r in got] == [tok.decode(r["tokens"]) for r in ref]
        # The tokens are what generate() gives for the tokenized prompts.
        ids = [tok.encode(t) for t in texts]
        assert [r.tokens for r in g.generate(ids, max_new_tokens=8, stop_ids=[tok.eos_token_id],
                                             pad_id=tok.pad_token_id or tok.eos_token_id)] == [r.tokens for r in got]
        # A stop string: cut where the CLI cuts, the text before it.
        text = got[1].text
        stop = text[len(text) // 2:len(text) // 2 + 2]
        if stop.strip() and "\ufffd" not in stop:
            cut = g.generate_text(tok, texts, max_new_tokens=8, stop=[stop])
            ref = cli_generate(tune, micro, texts, "--max-new-tokens", "8", "--stop", stop)
            assert [r.tokens for r in cut] == [r["tokens"] for r in ref]
            assert [r.stopped for r in cut] == [r["stopped"] for r in ref]
            assert cut[1].stopped and cut[1].text == text[:text.index(stop)]
            assert g.generate_text(tok, texts, max_new_tokens=8, stop=stop) == cut
        # Sampling: the CLI's seed gives the same tokens.
        sampled = g.generate_text(tok, texts, max_new_tokens=8, greedy=False, temperature=0.9, seed=11)
        ref = cli_generate(tune, micro, texts, "--max-new-tokens", "8", "--temperature", "0.9", "--seed", "11")
        assert [r.tokens for r in sampled] == [r["tokens"] for r in ref]
        for kw, message in [(dict(texts="The film"), "texts must be a sequence of str"),
                            (dict(texts=[1]), "texts[0] must be a str"),
                            (dict(texts=texts, stop=[""]), "the stop string is empty"),
                            (dict(texts=texts, ignore_eos=1), "ignore_eos must be a bool"),
                            (dict(texts=texts, stop=5), "stop must be a str or a sequence of str, not int"),
                            (dict(texts=texts, stop=["ok", 5]), "stop[1] must be a str, not int"),
                            (dict(texts=texts, stop="a\0b"), "stop contains a NUL character"),
                            (dict(texts=[""] * 0), "n_prompts must be at least 1")]:
            with pytest.raises(zo2.InvalidArgumentError) as e:
                g.generate_text(tok, max_new_tokens=8, **kw)
            assert message in str(e.value)


def test_generate_text_stops_at_the_models_generation_config_eos_ids(micro, tune, tmp_path):
    """Note [A model's end-of-sequence ids] (api/generate.h): generation_config.json's
    eos_token_id list stops a prompt as the CLI's generate stops it; ignore_eos ignores it."""
    import shutil
    model = tmp_path / "micro"
    shutil.copytree(micro, model)
    tok = zo2.Tokenizer.from_dir(model)
    texts = ["The film was"]
    with zo2.Session(model, training=False, max_seqs=1, max_seq_len=64, generate_seqs=1) as g:
        free = g.generate_text(tok, texts, max_new_tokens=8, ignore_eos=True)[0].tokens
    k = max(i for i in range(len(free)) if free[i] not in free[:i])
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[k]]}))
    with zo2.Session(model, training=False, max_seqs=1, max_seq_len=64, generate_seqs=1) as g:
        got = g.generate_text(tok, texts, max_new_tokens=8)[0]
        assert got.tokens == free[:k + 1] and got.stopped
        assert got.text == tok.decode(free[:k])
        assert g.generate_text(tok, texts, max_new_tokens=8, ignore_eos=True)[0].tokens == free
    ref = cli_generate(tune, model, texts, "--max-new-tokens", "8")
    assert ref[0]["tokens"] == got.tokens and ref[0]["text"] == got.text


def test_ctrl_c_stops_a_generation_promptly(tiny):
    import os
    import signal
    import threading
    import time
    with zo2.Session(tiny, training=False, max_seqs=1, generate_seqs=1, kv_cache="off") as s:
        start = time.perf_counter()
        s.generate([[1, 2, 3]] * 4, max_new_tokens=60)
        per_prompt = (time.perf_counter() - start) / 4
        prompts = [[1, 2, 3]] * max(40, int(8 / per_prompt))  # some 8 s of work uninterrupted
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            s.generate(prompts, max_new_tokens=60)
        took = time.perf_counter() - start
        timer.join()
        assert took < 2.0, took
        assert s.generate([[1, 2, 3]], max_new_tokens=3)[0].tokens  # still usable
