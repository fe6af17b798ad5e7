#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets that Python can make (fuzz/corpus/<target>/
seed-*): small real-looking files from the tests, data/examples and the trimmed GPT-2
vocabulary. The SentencePiece models and the seed logs were written by zo2 itself (see
fuzz/README.md); crash inputs added later are kept under other names. Run from anywhere."""
import json
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.dirname(here)
corpus = os.path.join(here, "corpus")


def put(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, bytes)] -> the file's bytes."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def f32(*v):
    return struct.pack("<%df" % len(v), *v)


def i64(*v):
    return struct.pack("<%dq" % len(v), *v)


# ---- safetensors ----------------------------------------------------------------------
put("safetensors", "f32-meta", safetensors([("model.w", "F32", [2, 3], f32(1, 2, 3, 4, 5, 6)),
                                            ("model.b", "F32", [3], f32(0.5, -1, 2))], {"format": "pt"}))
put("safetensors", "mixed", safetensors([("a", "BF16", [2, 2], b"\x80\x3f" * 4), ("b", "F16", [1], b"\x00\x3c"),
                                         ("c", "I64", [2], i64(7, -1)), ("d", "U8", [3], b"xyz"),
                                         ("e", "F8_E4M3", [2], b"\x38\x40"), ("f", "BOOL", [1], b"\x01")]))
put("safetensors", "scalar-empty", safetensors([("s", "F32", [], f32(3.5)), ("z", "F32", [0, 4], b""),
                                                ("i", "I32", [1, 1, 1], b"\x01\x00\x00\x00")]))
put("safetensors", "empty", safetensors([]))

# ---- safetensors_index (the shards the target writes: model.a.weight, model.b.bias in
# model-00001-of-00002.safetensors; lm_head.weight, model.empty in model-00002-of-00002) ----
s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
full = {"metadata": {"total_size": 38},
        "weight_map": {"lm_head.weight": s2, "model.a.weight": s1, "model.b.bias": s1, "model.empty": s2}}
put("safetensors_index", "full", json.dumps(full, indent=2, sort_keys=True) + "\n")
put("safetensors_index", "one-shard", json.dumps({"weight_map": {"model.a.weight": s1, "model.b.bias": s1}}))
put("safetensors_index", "missing", json.dumps({"metadata": {}, "weight_map": {"model.a.weight": s1,
                                                                                "x": "model-00003-of-00003.safetensors"}}))

# ---- config ---------------------------------------------------------------------------
opt = {"model_type": "opt", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
       "num_attention_heads": 4, "ffn_dim": 256, "max_position_embeddings": 64,
       "activation_function": "relu", "do_layer_norm_before": True, "word_embed_proj_dim": 64,
       "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32"}
put("config", "opt-tiny", json.dumps(opt, indent=2))
opt350 = dict(opt, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
              max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=512,
              do_layer_norm_before=False, architectures=["OPTForCausalLM"], enable_bias=True)
put("config", "opt-350m-postln", json.dumps(opt350, indent=2))
llama = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu",
         "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
put("config", "llama-tiny", json.dumps(llama, indent=2))
put("config", "llama31-8b", json.dumps({
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256}, indent=2))
put("config", "llama-linear-rope", json.dumps(dict(llama, rope_scaling={"type": "linear", "factor": 2.0},
                                                   head_dim=16, attention_bias=True, mlp_bias=True)))

# ---- tokenizers -----------------------------------------------------------------------
trim = os.path.join(here, "data", "gpt2-trim")
vocab = json.load(open(os.path.join(trim, "vocab.json"), encoding="utf-8"))
merge_lines = open(os.path.join(trim, "merges.txt"), encoding="utf-8").read().split("\n")[1:]
merge_lines = [m for m in merge_lines if m]
# Smaller still for the seeds: the byte tokens, 200 merges and <|endoftext|>.
K = 200
small_vocab = {k: v for k, v in vocab.items() if v < 256 + K}
small_vocab["<|endoftext|>"] = 256 + K
small_merges = merge_lines[:K]
vj = json.dumps(small_vocab, ensure_ascii=False)
put("tokenizer_gpt2", "gpt2-small", vj + "\0" + "#version: 0.2\n" + "\n".join(small_merges) + "\n")
put("tokenizer_gpt2", "gpt2-tiny", json.dumps({"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġab": 4, "<|endoftext|>": 5})
    + "\0" + "#version: 0.2\na b\nĠ ab\n")
put("tokenizer_gpt2", "no-version-crlf", json.dumps({k: v for k, v in small_vocab.items() if v < 300})
    + "\0" + "\r\n".join(small_merges[:44]) + "\r\n")

byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
gpt2_json = {
    "version": "1.0", "truncation": None, "padding": None,
    "added_tokens": [{"id": 256 + K, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                      "rstrip": False, "normalized": True, "special": True}],
    "normalizer": None, "pre_tokenizer": byte_level,
    "post_processor": dict(byte_level, add_prefix_space=True, trim_offsets=False),
    "decoder": dict(byte_level, add_prefix_space=True),
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
              "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
              "vocab": small_vocab, "merges": small_merges}}
put("tokenizer_json", "gpt2", json.dumps(gpt2_json, ensure_ascii=False))
llama3_pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
v3 = {k: v for k, v in small_vocab.items() if k != "<|endoftext|>"}
begin, end = 256 + K, 257 + K


def special(i, c):
    return {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


llama3_json = {
    "version": "1.0", "added_tokens": [special(begin, "<|begin_of_text|>"), special(end, "<|end_of_text|>")],
    "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": llama3_pattern}, "behavior": "Isolated", "invert": False},
        dict(byte_level, use_regex=False)]},
    "post_processor": {"type": "Sequence", "processors": [
        dict(byte_level, add_prefix_space=True, trim_offsets=False),
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [],
         "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [begin],
                                                  "tokens": ["<|begin_of_text|>"]}}}]},
    "decoder": dict(byte_level, add_prefix_space=True),
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
              "vocab": v3, "merges": [m.split(" ") for m in small_merges]}}
put("tokenizer_json", "llama3", json.dumps(llama3_json, ensure_ascii=False))
roberta = dict(gpt2_json, post_processor={"type": "RobertaProcessing", "sep": ["<|endoftext|>", 256 + K],
                                          "cls": ["<|endoftext|>", 256 + K], "trim_offsets": True,
                                          "add_prefix_space": False})
roberta["model"] = dict(gpt2_json["model"], merges=small_merges[:50])
put("tokenizer_json", "roberta-post", json.dumps(roberta, ensure_ascii=False))

# The pipeline features of Qwen, Gemma, Mistral (issue 19): one small file each.
qwen_pattern = llama3_pattern.replace(r"\p{N}{1,3}", r"\p{N}")
qwen = dict(llama3_json, normalizer={"type": "NFC"},
            pre_tokenizer={"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": qwen_pattern}, "behavior": "Isolated", "invert": False},
                dict(byte_level, use_regex=False)]},
            post_processor=dict(byte_level, add_prefix_space=False, use_regex=False),
            added_tokens=[special(begin, "<|im_start|>"),
                          dict(special(end, "<think>"), special=False)])
qwen["model"] = dict(llama3_json["model"], ignore_merges=False, continuing_subword_prefix="", end_of_word_suffix="")
put("tokenizer_json", "qwen-nfc", json.dumps(qwen, ensure_ascii=False))

M = "\u2581"
sp_chars = sorted(set("abcdefghijklmnopqrstuvwxyz.,!?' ") - {" "}) + [M]
sp_vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
for b in range(256):
    sp_vocab["<0x%02X>" % b] = len(sp_vocab)
for c in sp_chars:
    sp_vocab[c] = len(sp_vocab)
sp_merges = []
for a, b in [(M, "t"), ("h", "e"), (M + "t", "he"), (M, "a"), ("i", "n"), (M, M), (M + M, M + M)]:
    sp_merges.append([a, b])
    sp_vocab.setdefault(a + b, len(sp_vocab))
sp_model = {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": sp_vocab, "merges": sp_merges}
bos_template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
sp_specials = [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")]
sp_decoder = [{"type": "Replace", "pattern": {"String": M}, "content": " "}, {"type": "ByteFallback"},
              {"type": "Fuse"}]
put("tokenizer_json", "gemma-byte-fallback", json.dumps({
    "version": "1.0", "added_tokens": sp_specials,
    "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": M},
    "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
    "post_processor": bos_template, "decoder": {"type": "Sequence", "decoders": sp_decoder},
    "model": sp_model}, ensure_ascii=False))
put("tokenizer_json", "mistral-prepend", json.dumps({
    "version": "1.0", "added_tokens": sp_specials,
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": M}, {"type": "Replace", "pattern": {"String": " "}, "content": M}]},
    "pre_tokenizer": None, "post_processor": bos_template,
    "decoder": {"type": "Sequence", "decoders": sp_decoder + [
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": sp_model}, ensure_ascii=False))
put("tokenizer_json", "metaspace", json.dumps({
    "version": "1.0", "added_tokens": sp_specials, "normalizer": None,
    "pre_tokenizer": {"type": "Metaspace", "replacement": M, "prepend_scheme": "first", "split": True},
    "post_processor": bos_template,
    "decoder": {"type": "Metaspace", "replacement": M, "prepend_scheme": "first", "split": True},
    "model": dict(sp_model, byte_fallback=False, fuse_unk=False)}, ensure_ascii=False))
put("tokenizer_json", "split-behaviors", json.dumps({
    "version": "1.0", "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False},
        {"type": "Split", "pattern": {"String": "e"}, "behavior": "MergedWithNext", "invert": False},
        {"type": "Split", "pattern": {"Regex": r"[a-m]+"}, "behavior": "Contiguous", "invert": True},
        {"type": "Split", "pattern": {"String": "!"}, "behavior": "MergedWithPrevious", "invert": False}]},
    "decoder": {"type": "Fuse"}, "model": dict(sp_model, ignore_merges=True)}, ensure_ascii=False))
put("tokenizer_json", "normalizers", json.dumps({
    "version": "1.0",
    "added_tokens": [dict(special(1, "<s>"), special=False, normalized=True),
                     dict(special(2, "HELLO"), normalized=True)],
    "normalizer": {"type": "Sequence", "normalizers": [
        {"type": "NFKC"}, {"type": "Lowercase"}, {"type": "Strip", "strip_left": True, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "}, {"type": "NFD"}, {"type": "NFC"}]},
    "pre_tokenizer": {"type": "Metaspace", "replacement": M, "prepend_scheme": "always", "split": False},
    "decoder": {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"Regex": M + "+"}, "content": " "}, {"type": "Strip", "content": " ",
                                                                            "start": 1, "stop": 1}]},
    "model": sp_model}, ensure_ascii=False))

# tokenizer_dir: tokenizer_config.json NUL special_tokens_map.json NUL config.json
put("tokenizer_dir", "hf-opt", json.dumps({
    "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
    "bos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
                  "single_word": False, "__type": "AddedToken"},
    "eos_token": "<|endoftext|>", "pad_token": "<pad>", "unk_token": "<|endoftext|>",
    "added_tokens_decoder": {"956": {"content": "<|endoftext|>", "special": True},
                             "957": {"content": "<pad>", "special": True, "lstrip": False}},
    "tokenizer_class": "GPT2Tokenizer"}) + "\0" + json.dumps({
    "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<pad>",
    "unk_token": "<|endoftext|>"}) + "\0" + json.dumps({"bos_token_id": 956, "eos_token_id": 956,
                                                         "pad_token_id": 957}))
put("tokenizer_dir", "config-only", "\0\0" + json.dumps({"bos_token_id": 100, "eos_token_id": [101, 102],
                                                          "pad_token_id": None}))
put("tokenizer_dir", "add-eos", json.dumps({"add_bos_token": False, "add_eos_token": True,
                                            "eos_token": {"content": "<|endoftext|>"}}) + "\0\0")

# ---- dataset: two selector bytes, then the file (see dataset_fuzz.cpp) -------------------
# byte 0: the reader (0 JSONL, 1 sst2, 2 rte, 3 boolq, 4 cb, 5 copa, 6 wsc, 7 wic, 8 multirc,
# 9 record, 10 squad, 11 drop, 12 safetensors); byte 1: flags (bit 0 left padding, bits 1-2
# --max-len none/16/64/160, bits 3-4 --num-train 0/1/2/5, bit 5 no shuffling).
LEFT, NO_SHUFFLE = 0x01, 0x20


def maxlen(i):
    return i << 1


def num_train(i):
    return i << 3


def sel(reader, flags=0):
    return bytes([reader, flags])


def lines(path, n):
    with open(os.path.join(root, path), encoding="utf-8") as f:
        return "".join(f.readline() for _ in range(n))


def fixture(name):
    with open(os.path.join(root, "tests", "data", "tasks", name), "rb") as f:
        return f.read()


put("dataset", "text", sel(0) + lines("data/examples/reviews-text-train.jsonl", 4).encode())
put("dataset", "options", sel(0) + lines("data/examples/reviews-train.jsonl", 3).encode())
put("dataset", "completion-maxlen-left", sel(0, LEFT | maxlen(1)) + (
    '{"prompt": "Review: a slow, dull film. Sentiment:", "completion": " negative"}\n'
    '{"prompt": "Review: warm and funny, with a great cast and a clever plot that keeps going. '
    'Sentiment:", "completion": " positive"}\n\n'
    '{"prompt": "Q: 2+2?\\nA:", "completion": " 4"}\r\n').encode())
put("dataset", "sst2", sel(1) + b"sentence\tlabel\nit 's a charming and often affecting journey . \t1\n"
    b"unflinchingly bleak and desperate \t0\nthe acting , costumes , music , cinematography and sound are all "
    b"astounding \t1\n")
put("dataset", "rte", sel(2) + json.dumps({"premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
                                           "hypothesis": "Weapons of Mass Destruction Found in Iraq.",
                                           "label": "not_entailment", "idx": 0}).encode() + b"\n"
    + json.dumps({"premise": "A place of sorrow, after Pope John Paul II died.",
                  "hypothesis": "Pope John Paul II is dead.", "label": "entailment", "idx": 1}).encode() + b"\n")
put("dataset", "boolq", sel(3, num_train(1)) + json.dumps({"question": "do iran and afghanistan speak the same language",
                                                           "passage": "Persian language -- Persian is spoken in Iran and "
                                                           "Afghanistan.", "idx": 0, "label": True}).encode() + b"\n"
    + json.dumps({"question": "is the sun a star?", "passage": "The Sun is the star at the centre.",
                  "label": False}).encode() + b"\n")
put("dataset", "cb", sel(4, maxlen(1) | num_train(2)) + json.dumps({
    "premise": "It was a complex language. Not written down but handed down.",
    "hypothesis": "the language was peeled down", "label": "contradiction", "idx": 0}).encode() + b"\n"
    + json.dumps({"premise": "He said it might rain.", "hypothesis": "it will rain",
                  "label": "neutral"}).encode() + b"\n")
put("dataset", "copa", sel(5, NO_SHUFFLE) + json.dumps({"premise": "My body cast a shadow over the grass.",
                                                        "choice1": "The sun was rising.", "choice2": "The grass was cut.",
                                                        "question": "cause", "idx": 0, "label": 0}).encode() + b"\n"
    + json.dumps({"premise": "I hung up the phone.", "choice1": "I said goodbye.",
                  "choice2": "The line went dead.", "question": "effect", "label": 1}).encode() + b"\n")
# The six tasks of issue 20, from the test fixtures (tests/data/tasks/).
put("dataset", "wsc", sel(6) + fixture("wsc.jsonl"))
put("dataset", "wic", sel(7, LEFT) + fixture("wic.jsonl"))
put("dataset", "multirc", sel(8, NO_SHUFFLE) + fixture("multirc.jsonl"))
put("dataset", "multirc-sample", sel(8, num_train(2)) + fixture("multirc.jsonl"))
put("dataset", "record", sel(9) + fixture("record.jsonl"))
put("dataset", "record-maxlen-left", sel(9, LEFT | maxlen(3)) + fixture("record.jsonl"))
put("dataset", "squad", sel(10) + fixture("squad.json"))
put("dataset", "squad-maxlen-sample", sel(10, maxlen(3) | num_train(1)) + fixture("squad.json"))
put("dataset", "drop", sel(11, NO_SHUFFLE) + fixture("drop.json"))
put("dataset", "drop-maxlen-left", sel(11, LEFT | maxlen(3)) + fixture("drop.json"))
ids = i64(*[1, 5, 9, 33, 100, 200, 300, 2, 7, 8, 9, 10, 11, 12, 13, 14])
mask = i64(*([1] * 8 + [1] * 5 + [0] * 3))
put("dataset", "tokens", sel(12) + safetensors([("input_ids", "I64", [2, 8], ids),
                                                ("attention_mask", "I64", [2, 8], mask)]))
put("dataset", "tokens-labels", sel(12, LEFT | num_train(1)) + safetensors([
    ("input_ids", "I32", [1, 4], struct.pack("<4i", 5, 6, 7, 8)),
    ("labels", "I32", [1, 4], struct.pack("<4i", -100, 6, 7, 8))]))

# ---- state: zo2_state.json over the fixed files of state_fuzz.cpp -----------------------
import zlib  # noqa: E402

config = b'{"model_type": "opt", "vocab_size": 512}'
model = b"not parsed here: only its size and CRC-32 are checked"
log = b'{"base_model":"m","first_step":0,"run_seed":42,"storage_dtype":"fp32","zo2_seed_log":1}\n'
train_fields = {"total_steps": 10, "lr": 0.001, "eps": 0.001, "weight_decay": 0.0, "lr_schedule": "linear",
                "warmup_steps": 0, "batch_size": 4, "data": "/data/reviews-train.jsonl", "eval": "",
                "data_examples": 120, "task": "", "max_len": 0, "padding_side": "right", "num_train": 0,
                "shuffle": True, "data_seed": 42, "base_model": "out/micro", "shard_bytes": 5000000000,
                "run_seed": 42, "storage_dtype": "fp32", "save_dtype": "fp32", "next_step": 3}
v2 = dict(train_fields, zo2_state=2, step=3,
          files={"config.json": {"bytes": len(config), "crc32": zlib.crc32(config)},
                 "model.safetensors": {"bytes": len(model), "crc32": zlib.crc32(model)}},
          seed_log={"path": "seed_log.jsonl", "bytes": len(log), "crc32": zlib.crc32(log), "next_step": 0})
put("state", "v2-manifest", json.dumps(v2, indent=2, sort_keys=True) + "\n")
put("state", "v1", json.dumps(dict(train_fields, zo2_state=1), indent=2) + "\n")
bad = json.loads(json.dumps(v2))
bad["files"]["model.safetensors"]["crc32"] ^= 1
put("state", "v2-bad-crc", json.dumps(bad))
