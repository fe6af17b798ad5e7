#!/usr/bin/env python3
"""A minimal, faithful PyTorch MeZO baseline for zo2-bench's side-by-side rows.

The same model shapes as zo2's presets (OPT: learned positions, pre-LN, ReLU, tied head),
random weights, one batch of B x T tokens, and the MeZO step as the MeZO/ZO2 reference
code writes it: seed, perturb every parameter in place by +eps*z (z regenerated from the
seed), forward, perturb by -2*eps*z, forward, restore by +eps*z, then regenerate z once
more for the update theta -= lr * (g * z + wd * theta). Four regenerations of z per step.

    python3 bench/mezo_torch.py --preset opt-125m --batch-size 1 --seq-len 128 --steps 3
prints one JSON object: median step time and tokens/s. Needs torch (Debian: python3-torch).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {  # hidden, layers, heads, ffn, vocab, positions
    "opt-tiny": (64, 2, 4, 256, 512, 64),
    "opt-micro": (128, 4, 4, 512, 50272, 512),
    "opt-125m": (768, 12, 12, 3072, 50272, 2048),
    "opt-350m-prenorm": (1024, 24, 16, 4096, 50272, 2048),
    "opt-1.3b": (2048, 24, 32, 8192, 50272, 2048),
}


class Block(nn.Module):
    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(h)
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(h, h)
        self.v = nn.Linear(h, h)
        self.o = nn.Linear(h, h)
        self.ln2 = nn.LayerNorm(h)
        self.fc1 = nn.Linear(h, ffn)
        self.fc2 = nn.Linear(ffn, h)

    def forward(self, x):
        B, T, H = x.shape
        y = self.ln1(x)
        q = self.q(y).view(B, T, self.heads, -1).transpose(1, 2)
        k = self.k(y).view(B, T, self.heads, -1).transpose(1, 2)
        v = self.v(y).view(B, T, self.heads, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True) if hasattr(F, "scaled_dot_product_attention") \
            else self._attn(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, H))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))

    @staticmethod
    def _attn(q, k, v):
        T = q.shape[-2]
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        return s.softmax(-1) @ v


class Opt(nn.Module):
    def __init__(self, h, layers, heads, ffn, vocab, positions):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.pos = nn.Embedding(positions + 2, h)
        self.blocks = nn.ModuleList(Block(h, heads, ffn) for _ in range(layers))
        self.ln = nn.LayerNorm(h)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(T) + 2)
        for b in self.blocks:
            x = b(x)
        logits = self.ln(x) @ self.embed.weight.t()  # tied head
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def perturb(params, seed, scale, eps):
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
        p.data = p.data + scale * z * eps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="opt-125m", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Opt(*PRESETS[a.preset]).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, PRESETS[a.preset][4], (a.batch_size, a.seq_len))
    lr, eps, wd = 1e-6, 1e-3, 0.0
    times = []
    with torch.inference_mode():
        for step in range(a.steps + 1):
            t0 = time.perf_counter()
            seed = 1000 + step
            perturb(params, seed, 1, eps)
            lp = model(ids).item()
            perturb(params, seed, -2, eps)
            lm = model(ids).item()
            perturb(params, seed, 1, eps)
            g = (lp - lm) / (2 * eps)
            torch.manual_seed(seed)
            for p in params:
                z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
                p.data = p.data - lr * (g * z + wd * p.data)
            if step > 0:  # the first step warms up
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"impl": "pytorch-mezo", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "preset": a.preset, "batch": a.batch_size, "seq": a.seq_len, "step_s_median": med,
                      "tokens_per_s": a.batch_size * a.seq_len / med}))


if __name__ == "__main__":
    main()
