#!/usr/bin/env python3
"""Lane-level simulation of fused::flash_attention_kernel (runtime/cuda/attention.cu).

Written in a session without a GPU to check the kernel's index algebra before it ever runs:
every register index and shared-memory address is computed as the kernel computes it (one
loop over the 32 lanes where the kernel has one lane), and mma.m16n8k16 takes and returns
its fragments as the PTX ISA lays them out ("Matrix fragments for mma.m16n8k16 with
floating point type"; g = lane / 4, c = lane % 4):
    A: a0 = (g, 2c..2c+1), a1 = (g+8, 2c..), a2 = (g, 2c+8..), a3 = (g+8, 2c+8..)
    B: b0 = (k = 2c..2c+1, n = g), b1 = (k = 2c+8.., n = g)
    C: c0, c1 = (g, 2c..2c+1), c2, c3 = (g+8, 2c..2c+1)
The output is compared with a direct softmax attention in float64 (Q, K, V and P rounded
to fp16 as the kernel rounds them). It checks the algebra, not the GPU: a wrong fragment
index, a swapped operand or a wrong mask fails it; a mistake in the layout above would
not. Keep it in step with the kernel. Exit 77 (CTest: skipped) without numpy.
"""
import sys
try:
    import numpy as np
except ImportError:
    print("numpy is not importable; skipped")
    sys.exit(77)
rng = np.random.default_rng(0)
kBQ = kBK = 64; kWarps = 4
NEG = -np.inf

def mma(c, a, b0, b1):
    """c[lane][4] += A·B; a[lane][4] pairs, b0/b1[lane] pairs (lo = lower column/row)."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i, (r, col) in enumerate([(g, 2*t), (g+8, 2*t), (g, 2*t+8), (g+8, 2*t+8)]):
            A[r, col], A[r, col+1] = a[lane][i]
        B[2*t, g], B[2*t+1, g] = b0[lane]
        B[2*t+8, g], B[2*t+9, g] = b1[lane]
    C = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c[lane][0] += C[g, 2*t]; c[lane][1] += C[g, 2*t+1]
        c[lane][2] += C[g+8, 2*t]; c[lane][3] += C[g+8, 2*t+1]

def r16(x): return float(np.float16(x))

def ld32(arr, r, col): return (arr[r, col], arr[r, col+1])

def mma_tile(acc, n, a_frags, kstep, smem, col0):
    """acc[lane][n] += A·B, A = a_frags[lane][kstep], b0/b1 = two adjacent elements of smem
    row 8n + g at columns col0 + 2c and col0 + 2c + 8 (K for S = QKᵀ, Vᵀ for O = PV)."""
    mma([acc[lane][n] for lane in range(32)], [a_frags[lane][kstep] for lane in range(32)],
        [ld32(smem, 8*n + (lane >> 2), col0 + 2*(lane & 3)) for lane in range(32)],
        [ld32(smem, 8*n + (lane >> 2), col0 + 2*(lane & 3) + 8) for lane in range(32)])

def kernel(Q, K, V, mask, seq, D, scale, causal, q0, out):
    kLdh, kLdv = D + 8, kBK + 8
    sq = np.zeros((kBQ, kLdh)); sk = np.zeros((kBK, kLdh)); svt = np.zeros((D, kLdv)); skeep = np.zeros(kBK, int)
    for r in range(kBQ):
        if q0 + r < seq: sq[r, :D] = Q[q0 + r]
    for warp in range(kWarps):
        qf = [[[None]*4 for _ in range(D//16)] for _ in range(32)]
        for lane in range(32):
            g, c = lane >> 2, lane & 3
            r0 = warp*16 + g; r8 = r0 + 8
            for kk in range(D//16):
                qf[lane][kk] = [ld32(sq, r0, 16*kk + 2*c), ld32(sq, r8, 16*kk + 2*c),
                                ld32(sq, r0, 16*kk + 8 + 2*c), ld32(sq, r8, 16*kk + 8 + 2*c)]
        t = [[q0 + warp*16 + (l >> 2), q0 + warp*16 + (l >> 2) + 8] for l in range(32)]
        m = [[NEG, NEG] for _ in range(32)]; l = [[0.0, 0.0] for _ in range(32)]
        o = [[[0.0]*4 for _ in range(D//8)] for _ in range(32)]
        key_end = min(q0 + kBQ, seq) if causal else seq
        for k0 in range(0, key_end, kBK):
            sk[:] = 0; svt[:] = 0
            for r in range(kBK):
                if k0 + r < seq:
                    sk[r, :D] = K[k0 + r]
                    svt[:D, r] = V[k0 + r]
                skeep[r] = int(k0 + r < seq and mask[k0 + r] != 0)
            s = [[[0.0]*4 for _ in range(kBK//8)] for _ in range(32)]
            for n in range(kBK//8):
                for kk in range(D//16):
                    mma_tile(s, n, qf, kk, sk, 16*kk)
            tile_max = [[NEG, NEG] for _ in range(32)]
            for lane in range(32):
                c = lane & 3
                for n in range(kBK//8):
                    for e in range(4):
                        r, j = e >> 1, 8*n + 2*c + (e & 1)
                        vis = skeep[j] != 0 and (not causal or k0 + j <= t[lane][r])
                        s[lane][n][e] = s[lane][n][e]*scale if vis else NEG
                        tile_max[lane][r] = max(tile_max[lane][r], s[lane][n][e])
            for x in (1, 2):
                tile_max = [[max(tile_max[ln][r], tile_max[ln ^ x][r]) for r in range(2)] for ln in range(32)]
            corr = [[0, 0] for _ in range(32)]
            for lane in range(32):
                for r in range(2):
                    mn = max(m[lane][r], tile_max[lane][r])
                    corr[lane][r] = 1.0 if mn == NEG else np.exp(m[lane][r] - mn)
                    m[lane][r] = mn; l[lane][r] *= corr[lane][r]
                for n in range(D//8):
                    o[lane][n] = [o[lane][n][0]*corr[lane][0], o[lane][n][1]*corr[lane][0],
                                  o[lane][n][2]*corr[lane][1], o[lane][n][3]*corr[lane][1]]
            pf = [[[None]*4 for _ in range(kBK//16)] for _ in range(32)]
            for lane in range(32):
                for n in range(kBK//8):
                    for e in range(4):
                        r = e >> 1
                        s[lane][n][e] = 0.0 if s[lane][n][e] == NEG else np.exp(s[lane][n][e] - m[lane][r])
                        l[lane][r] += s[lane][n][e]
                    pf[lane][n//2][(n % 2)*2] = (r16(s[lane][n][0]), r16(s[lane][n][1]))
                    pf[lane][n//2][(n % 2)*2 + 1] = (r16(s[lane][n][2]), r16(s[lane][n][3]))
            for n in range(D//8):
                for j in range(kBK//16):
                    mma_tile(o, n, pf, j, svt, 16*j)
        for x in (1, 2):
            l = [[l[ln][r] + l[ln ^ x][r] for r in range(2)] for ln in range(32)]
        for lane in range(32):
            c = lane & 3
            for r in range(2):
                if t[lane][r] >= seq: continue
                inv = 1.0/l[lane][r] if l[lane][r] > 0 else 0.0
                for n in range(D//8):
                    out[t[lane][r], 8*n + 2*c] = r16(o[lane][n][2*r]*inv)
                    out[t[lane][r], 8*n + 2*c + 1] = r16(o[lane][n][2*r + 1]*inv)

def reference(Q, K, V, mask, seq, scale, causal):
    out = np.zeros_like(Q)
    for i in range(seq):
        vis = np.array([mask[j] != 0 and (not causal or j <= i) for j in range(seq)])
        if not vis.any(): continue
        s = (Q[i] @ K.T) * scale; s[~vis] = -np.inf
        p = np.exp(s - s.max()); p /= p.sum(); out[i] = p @ V
    return out

failed = 0
for seq, D, causal, pad in [(77, 64, True, True), (131, 64, False, True), (70, 128, True, False),
                            (5, 64, True, True), (150, 128, True, True)]:
    Q, K, V = (np.float16(rng.standard_normal((seq, D))).astype(np.float64) for _ in range(3))
    mask = np.ones(seq, int)
    if pad: mask[:3] = 0; mask[-4:] = 0
    scale = 1/np.sqrt(D)
    out = np.full((seq, D), 7.0)
    nblocks = (seq + kBQ - 1)//kBQ
    for b in range(nblocks): kernel(Q, K, V, mask, seq, D, scale, causal, b*kBQ, out)
    ref = reference(Q, K, V, mask, seq, scale, causal)
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
    ok = err < 8e-3
    failed += not ok
    print(f"T {seq} D {D} causal {causal} padding {pad}: max |out - ref| / max |ref| = {err:.2e}",
          "ok" if ok else "FAILED")
sys.exit(1 if failed else 0)
