"""MeZO fine-tuning over a JSONL file of {"text": ...} lines, with zo2's Python API.

    python3 mezo_jsonl.py MODEL_DIR TRAIN.jsonl DEV.jsonl OUT_DIR [STEPS]
"""
import json, sys
import numpy as np
import zo2

model_dir, train, dev, out = sys.argv[1:5]
steps = int(sys.argv[5]) if len(sys.argv) > 5 else 300
tok = zo2.Tokenizer.from_dir(model_dir)                      # the model's tokenizer files
def load(path):                                                # -> ids [N, T] and mask, right-padded
    seqs = [tok.encode(json.loads(line)["text"]) for line in open(path) if line.strip()]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs): ids[i, :len(s)] = s
    return ids, (np.arange(ids.shape[1]) < np.array([[len(s)] for s in seqs])).astype(np.int32)
(x, m), (dx, dm) = load(train), load(dev)
B, rng = 16, np.random.default_rng(0)
with zo2.Session(model_dir, lr=1e-3, eps=1e-3, max_seqs=max(B, len(dx)), max_seq_len=max(x.shape[1], dx.shape[1])) as s:
    print(f"dev loss before: {s.eval(dx, attention_mask=dm):.4f}")
    for step in range(steps):
        rows = rng.choice(len(x), B, replace=False)           # a random batch; labels = ids where mask is 1
        r = s.step(x[rows], attention_mask=m[rows])
        if step % 50 == 0 or step == steps - 1: print(f"step {step + 1}: loss {r.loss:.4f}  g {r.projected_grad:+.3e}")
    print(f"dev loss after:  {s.eval(dx, attention_mask=dm):.4f}")
    s.save(out)                                               # an HF checkpoint (run directory)
