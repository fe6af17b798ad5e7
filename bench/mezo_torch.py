#!/usr/bin/env python3
"""A minimal, faithful PyTorch MeZO baseline for zo2-bench's side-by-side rows.

The model is built from a Hugging Face config.json (--config; zo2-bench writes the
preset's) or from a few built-in OPT shapes (--preset): OPT (learned positions with offset
2, pre- or post-LN, ReLU, project_in/out when word_embed_proj_dim != hidden_size, biases,
tied or untied head) and LLaMA (RMSNorm, RoPE, SwiGLU, grouped-query attention, tied or
untied head) with its variants Qwen2, Qwen3, Mistral and Gemma 3 text (LlamaBlock's docstring
says what each adds; sliding windows are not modelled). Random weights, one batch of B x T tokens, and the MeZO step as the
MeZO/ZO2 reference code writes it (MeZO's trainer.py, zo_perturb_parameters/zo_update):

    seed; perturb every parameter in place by +eps*z (z regenerated from the seed);
    forward -> L+; perturb by -2*eps*z; forward -> L-; restore by +eps*z;
    g = (L+ - L-) / (2*eps); regenerate z once more and update
    theta -= lr * (g*z + wd*theta)   (no weight decay on biases and norm weights)

Four regenerations of z per step, as in MeZO. Prints one JSON object: the mean step time
over --steps steps after --warmup steps (and the median), tokens/s = B*T / mean step.

    python3 bench/mezo_torch.py --preset opt-125m --batch-size 1 --seq-len 128 --steps 3
    python3 bench/mezo_torch.py --config config.json --dtype bf16 --device cuda ...

Needs torch (Debian: python3-torch).
"""
import argparse
import json
import math
import statistics
import sys
import time

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError as e:  # zo2-bench checks for torch first; this is for people running it by hand
    sys.exit(f"mezo_torch.py: torch is not importable by {sys.executable} ({e}); "
             "install it (Debian: apt-get install python3-torch) or run another python")

PRESETS = {  # hidden, layers, heads, ffn, vocab, positions (OPT, pre-LN, tied head)
    "opt-tiny": (64, 2, 4, 256, 512, 64),
    "opt-micro": (128, 4, 4, 512, 50272, 512),
    "opt-125m": (768, 12, 12, 3072, 50272, 2048),
    "opt-350m-prenorm": (1024, 24, 16, 4096, 50272, 2048),
    "opt-1.3b": (2048, 24, 32, 8192, 50272, 2048),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def attention(q, k, v):
    """Causal softmax attention on [B, heads, T, d]."""
    if hasattr(F, "scaled_dot_product_attention"):  # torch >= 2.0
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[-2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool, device=q.device), 1), float("-inf"))
    return s.softmax(-1) @ v


class OptBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, bias = c["hidden_size"], c.get("enable_bias", True)
        self.heads = c["num_attention_heads"]
        self.pre_ln = c.get("do_layer_norm_before", True)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=c.get("layer_norm_elementwise_affine", True))
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(h, h, bias=bias) for _ in range(4))
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=c.get("layer_norm_elementwise_affine", True))
        self.fc1 = nn.Linear(h, c["ffn_dim"], bias=bias)
        self.fc2 = nn.Linear(c["ffn_dim"], h, bias=bias)

    def forward(self, x):
        B, T, H = x.shape
        y = self.self_attn_layer_norm(x) if self.pre_ln else x
        q, k, v = (p(y).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.out_proj(attention(q, k, v).transpose(1, 2).reshape(B, T, H))
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        y = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(F.relu(self.fc1(y)))
        return x if self.pre_ln else self.final_layer_norm(x)


class Opt(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, e = c["hidden_size"], c.get("word_embed_proj_dim") or c["hidden_size"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], e)
        self.embed_positions = nn.Embedding(c["max_position_embeddings"] + 2, h)
        self.project_in = nn.Linear(e, h, bias=False) if e != h else None
        self.project_out = nn.Linear(h, e, bias=False) if e != h else None
        self.layers = nn.ModuleList(OptBlock(c) for _ in range(c["num_hidden_layers"]))
        pre_ln = c.get("do_layer_norm_before", True) and not c.get("_remove_final_layer_norm", False)
        self.final_layer_norm = nn.LayerNorm(h) if pre_ln else None
        self.lm_head = None if c.get("tie_word_embeddings", True) else nn.Linear(e, c["vocab_size"], bias=False)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.embed_tokens(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(torch.arange(T, device=ids.device) + 2)
        for b in self.layers:
            x = b(x)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x @ (self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight).t()


class RMSNorm(nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x · rsqrt(mean x² + eps) · (1 + w), the factor in fp32, w starting at 0."""

    def __init__(self, h, eps):
        super().__init__(h, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class LlamaBlock(nn.Module):
    """LLaMA, and the LLaMA-family variants zo2 runs (model_type): qwen2 (q/k/v biases), qwen3
    (per-head q/k RMSNorms, head_dim of its own), mistral (LLaMA's block; its sliding window is
    a mask, not modelled: the cost of full causal attention), gemma3_text ((1 + w) norms, norms
    after attention and around the MLP, q/k norms, gelu_tanh(gate)·up; its local layers' window
    not modelled either)."""

    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        kind = c.get("model_type", "llama")
        self.gemma = kind == "gemma3_text"
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads") or self.heads
        self.head_dim = c.get("head_dim") or h // self.heads
        ab, mb = c.get("attention_bias", False), c.get("mlp_bias", False)
        qkv_bias = ab or kind == "qwen2"
        Norm = GemmaRMSNorm if self.gemma else RMSNorm
        eps = c.get("rms_norm_eps", 1e-6)
        self.input_layernorm = Norm(h, eps)
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=ab)
        self.q_norm = Norm(self.head_dim, eps) if kind in ("qwen3", "gemma3_text") else None
        self.k_norm = Norm(self.head_dim, eps) if kind in ("qwen3", "gemma3_text") else None
        self.post_attention_layernorm = Norm(h, eps)
        self.pre_feedforward_layernorm = Norm(h, eps) if self.gemma else None
        self.post_feedforward_layernorm = Norm(h, eps) if self.gemma else None
        f = c["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(h, f, bias=mb), nn.Linear(h, f, bias=mb)
        self.down_proj = nn.Linear(f, h, bias=mb)
        self.scale = (c.get("query_pre_attn_scalar") or self.head_dim) ** -0.5 if self.gemma else None

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        y = self.input_layernorm(x)
        q = self.q_proj(y).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(y).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(y).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.gemma:
            if self.kv_heads != self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            # query_pre_attn_scalar^-0.5 instead of head_dim^-0.5: fold it into q.
            a = attention(q * (self.scale * math.sqrt(self.head_dim)), k, v)
            x = x + self.post_attention_layernorm(self.o_proj(a.transpose(1, 2).reshape(B, T, -1)))
            y = self.pre_feedforward_layernorm(x)
            m = self.down_proj(F.gelu(self.gate_proj(y), approximate="tanh") * self.up_proj(y))
            return x + self.post_feedforward_layernorm(m)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        x = x + self.o_proj(attention(q, k, v).transpose(1, 2).reshape(B, T, -1))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c["hidden_size"]
        self.gemma = c.get("model_type") == "gemma3_text"
        self.embed_tokens = nn.Embedding(c["vocab_size"], h)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c["num_hidden_layers"]))
        self.norm = (GemmaRMSNorm if self.gemma else RMSNorm)(h, c.get("rms_norm_eps", 1e-6))
        self.embed_scale = math.sqrt(h) if self.gemma else None
        self.lm_head = None if c.get("tie_word_embeddings", False) else nn.Linear(h, c["vocab_size"], bias=False)
        d = self.layers[0].head_dim if len(self.layers) else h // c["num_attention_heads"]
        theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        # Rotary scaling (linear, llama3) changes these frequencies, not the cost: not modelled.
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, ids):
        T = ids.shape[1]
        angles = torch.outer(torch.arange(T, device=ids.device).float(), self.inv_freq)
        emb = torch.cat((angles, angles), dim=-1)
        x = self.embed_tokens(ids)
        if self.embed_scale is not None:  # Gemma: embeddings × √hidden, rounded to the compute dtype
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for b in self.layers:
            x = b(x, cos, sin)
        x = self.norm(x)
        return x @ (self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight).t()


def build(config):
    kind = config.get("model_type", "opt")
    if kind == "opt":
        return Opt(config)
    if kind in ("llama", "qwen2", "qwen3", "mistral", "gemma3_text"):
        return Llama(config)
    sys.exit(f"mezo_torch.py: --config: model_type '{kind}' is not supported "
             "(opt, llama, qwen2, qwen3, mistral, gemma3_text)")


def loss_of(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def perturb(params, seed, scale, eps):
    """MeZO's zo_perturb_parameters, in place: theta += scale * eps * z(seed)."""
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data.add_(z, alpha=scale * eps)


def update(params, seed, lr, g, wd):
    """MeZO's zo_update: regenerate z and take theta -= lr * (g*z + wd*theta)."""
    torch.manual_seed(seed)
    for name, p in params:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        if wd and "bias" not in name and "norm" not in name:
            p.data.mul_(1 - lr * wd)
        p.data.add_(z, alpha=-lr * g)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--config", help="a Hugging Face config.json (OPT or LLaMA) giving the model shape")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a built-in OPT shape (default opt-125m)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="measured steps")
    ap.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter and compute dtype")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0 or a.batch_size < 1 or a.seq_len < 2:
        sys.exit("mezo_torch.py: need --steps >= 1, --warmup >= 0, --batch-size >= 1, --seq-len >= 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.config:
        try:
            with open(a.config) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"mezo_torch.py: --config {a.config}: {e}")
        name = config.get("_name_or_path") or a.config
    else:
        name = a.preset or "opt-125m"
        h, layers, heads, ffn, vocab, positions = PRESETS[name]
        config = {"model_type": "opt", "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
                  "ffn_dim": ffn, "vocab_size": vocab, "max_position_embeddings": positions}
    device = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    if device.type == "cuda" and hasattr(torch.device, "__enter__"):
        # torch >= 2.0: construct (and randomly initialize) on the GPU; a 6.7B model's init
        # on the host takes longer than the timed steps. Then free the fp32 copies.
        with device:
            model = build(config)
        model = model.to(dtype=DTYPES[a.dtype]).eval()
        torch.cuda.empty_cache()
    else:
        model = build(config).to(device=device, dtype=DTYPES[a.dtype]).eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights once
    ids = torch.randint(0, config["vocab_size"], (a.batch_size, a.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for step in range(a.warmup + a.steps):
            sync()
            t0 = time.perf_counter()
            seed = 1000 + step
            perturb(params, seed, 1, a.eps)
            lp = loss_of(model, ids).item()
            perturb(params, seed, -2, a.eps)
            lm = loss_of(model, ids).item()
            perturb(params, seed, 1, a.eps)
            g = (lp - lm) / (2 * a.eps)
            update(params, seed, a.lr, g, a.weight_decay)
            sync()
            if step >= a.warmup:
                times.append(time.perf_counter() - t0)
    mean = statistics.fmean(times)
    out = {"impl": "pytorch-mezo", "torch": torch.__version__, "threads": torch.get_num_threads(),
           "device": str(device), "dtype": a.dtype, "model": name, "model_type": config.get("model_type", "opt"),
           "params": sum(p.numel() for _, p in params), "batch": a.batch_size, "seq": a.seq_len,
           "steps": a.steps, "warmup": a.warmup, "step_s": mean, "step_s_median": statistics.median(times),
           "tokens_per_s": a.batch_size * a.seq_len / mean}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
