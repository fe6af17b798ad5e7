#!/usr/bin/env python3
"""Golden references from Hugging Face transformers for the LLaMA-family variants zo2 reads
(issue 19): Qwen2 (q/k/v biases, tied and untied head, a window in some layers), Qwen3
(per-head q/k norms, head_dim != hidden/heads, tied and untied), Mistral (a sliding window
shorter than the sequence) and Gemma 3 text (its local/global layer mix; soft-capping).

Needs torch and transformers, which this repository's machines lack: it runs on the lent GPU
machine (scripts/gpu-check.sh, phase `goldens`), on the CPU in fp32 with eager attention, and
writes one folder per model in ../shared/golden's format (its README):
  config.json, model.safetensors    the checkpoint, as save_pretrained writes it
  golden.safetensors                input_ids I64 [3,16], attention_mask I64 [3,16] (rows 1 and
                                    2 right-padded, token 1 at padded positions), logits F32
                                    [3,16,V], hidden_states.i F32 (output_hidden_states), loss
                                    F32 [1] (labels = input_ids, padding -100)
Copy the folders into tests/data/golden/; tests/golden_test.cpp runs every folder there
beside ../shared/golden's.

Usage: python3 scripts/make-goldens.py OUT_DIR [--only NAME ...]
"""
import argparse
import json
import os
import sys
import traceback


def models():
    """name -> (config class name, config kwargs)."""
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return {
        # q/k/v biases, untied head
        "qwen2-tiny": ("Qwen2Config", dict(common, tie_word_embeddings=False, use_sliding_window=False)),
        # q/k/v biases, tied head, multi-query attention
        "qwen2-tiny-tied": ("Qwen2Config", dict(common, tie_word_embeddings=True, num_key_value_heads=1,
                                                use_sliding_window=False)),
        # per-head q_norm/k_norm before RoPE, head_dim 24 != 64 / 4
        "qwen3-tiny": ("Qwen3Config", dict(common, head_dim=24, tie_word_embeddings=False, attention_bias=False,
                                           use_sliding_window=False)),
        # the window in layer 1 only (use_sliding_window, layers >= max_window_layers slide)
        "qwen2-tiny-window": ("Qwen2Config", dict(common, tie_word_embeddings=False, use_sliding_window=True,
                                                  sliding_window=4, max_window_layers=1)),
        # q/k norms with a tied head and multi-query attention
        "qwen3-tiny-tied": ("Qwen3Config", dict(common, head_dim=16, num_key_value_heads=1, tie_word_embeddings=True,
                                                attention_bias=False, use_sliding_window=False)),
        # a window of 4 keys, shorter than the 16-token sequence
        "mistral-tiny": ("MistralConfig", dict(common, sliding_window=4, tie_word_embeddings=False)),
        # Gemma 3 text: local (window 4 < 16) / global / local layers with their own rope bases, linear
        # scaling on the global ones, head_dim 32 != 64 / 4, query_pre_attn_scalar 24, q/k norms, (1 + w)
        # norms around attention and the MLP, gelu_tanh gate, embeddings × √hidden, tied head; no
        # soft-capping (gemma3-tiny-softcap has it). layer_types for transformers >= 4.53; sliding_window_pattern 2
        # gives the same mix on older ones.
        "gemma3-tiny": ("Gemma3TextConfig",
                        dict({k: v for k, v in common.items() if k != "hidden_act"}, num_hidden_layers=3,
                             head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                             sliding_window_pattern=2, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                             rope_scaling={"rope_type": "linear", "factor": 4.0},
                             hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                             attn_logit_softcapping=None, tie_word_embeddings=True)),
        # the same with soft-capping that bends these scores and logits (Gemma 2's fields, which
        # Gemma3TextConfig takes too), multi-query attention and an untied head
        "gemma3-tiny-softcap": ("Gemma3TextConfig",
                                dict({k: v for k, v in common.items() if k != "hidden_act"}, num_hidden_layers=3,
                                     num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                     sliding_window_pattern=2, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                     rope_scaling={"rope_type": "linear", "factor": 4.0},
                                     hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=1.5,
                                     attn_logit_softcapping=2.0, tie_word_embeddings=False)),
    }


def v5_kwargs(kwargs):
    """transformers >= 5 names the rotary settings rope_parameters (per layer type for
    Gemma 3); the v4 names are given to it as what they mean there, explicitly, rather than
    through its backward-compatible conversion."""
    kw = dict(kwargs)
    theta = kw.pop("rope_theta", 10000.0)
    scaling = kw.pop("rope_scaling", None)
    if "rope_local_base_freq" in kw:  # Gemma 3: the scaling is the global layers'
        local = kw.pop("rope_local_base_freq")
        kw.pop("sliding_window_pattern", None)
        full = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
        kw["rope_parameters"] = {"full_attention": full,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    else:
        kw["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=theta)
    return kw


def make_one(torch, transformers, save_file, major, args, name, cls_name, kwargs):
    cfg = getattr(transformers, cls_name)(**(v5_kwargs(kwargs) if major >= 5 else kwargs))
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    # A wide spread, so that any wrong op shows in the output: weights N(0, 0.3), norm
    # weights 1 + N(0, 0.3), biases N(0, 0.3).
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    d = os.path.join(args.out, name)
    try:
        model.save_pretrained(d, safe_serialization=True)
    except TypeError:  # a transformers that writes safetensors only, without the option
        model.save_pretrained(d)

    B, T = 3, 16
    ids = torch.randint(3, cfg.vocab_size, (B, T), dtype=torch.int64)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[1, 12:] = 0
    mask[2, 9:] = 0
    ids[mask == 0] = 1
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    tensors = {"input_ids": ids, "attention_mask": mask, "logits": out.logits.float().contiguous(),
               "loss": out.loss.float().reshape(1)}
    for i, h in enumerate(out.hidden_states):
        tensors[f"hidden_states.{i}"] = h.float().contiguous()
    save_file(tensors, os.path.join(d, "golden.safetensors"))
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__, "seed": args.seed,
                   "config_class": cls_name, "hidden_states": len(out.hidden_states)}, f, indent=1)
    print(f"{name}: loss {out.loss.item():.6f}, logits {tuple(out.logits.shape)}, "
          f"{len(out.hidden_states)} hidden states", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import save_file

    major = int(transformers.__version__.split(".")[0])
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    done, failed = [], []
    for name, (cls_name, kwargs) in models().items():
        if args.only and name not in args.only:
            continue
        # Each model from its own seed, so that one model's failure (or --only) changes no
        # other model's weights or batch; and one failure does not stop the others.
        torch.manual_seed(args.seed + sum(map(ord, name)))
        try:
            make_one(torch, transformers, save_file, major, args, name, cls_name, kwargs)
            done.append(name)
        except Exception:  # noqa: BLE001 - report it and go on with the other models
            traceback.print_exc()
            failed.append(name)
            print(f"{name}: FAILED", flush=True)
    print(f"made {len(done)}: {' '.join(done)}; failed {len(failed)}: {' '.join(failed)}", flush=True)
    if not done and not failed:
        print("make-goldens: nothing to do", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
