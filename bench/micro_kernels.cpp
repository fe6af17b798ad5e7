// Kernel microbenchmarks through the op table (runtime/ops.h) on every available backend:
// the CPU always, CUDA when a device exists (its benchmarks are registered only then).
// GEMM (linear-layer shapes), causal attention, LayerNorm, RMSNorm, tiled cross-entropy,
// the fused perturbation (W ± eps·z, per storage dtype) and the fused update.
//
// Each iteration enqueues the op on a stream between two events of the backend and reports
// the time between them (manual time: on CUDA, cudaEventElapsedTime; on the CPU, the
// stream worker's timeline), so host launch/synchronization overhead is not counted.
//
//   build/bench/zo2_microbench --benchmark_filter='Kernel.*/cpu' --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/ops.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace zo2;

struct Backend {
  std::unique_ptr<Device> device;
  std::unique_ptr<Stream> stream;
  std::unique_ptr<Event> start, stop;
};

// One device per backend for the whole run (never destroyed: CUDA may already be torn
// down when static destructors run).
Backend& backend(DeviceKind kind) {
  static Backend* backends[2] = {nullptr, nullptr};
  Backend*& b = backends[kind == DeviceKind::cpu ? 0 : 1];
  if (b == nullptr) {
    DeviceOptions o;
    o.kind = kind;
    o.mem_cap = std::size_t{3} << 30;
    b = new Backend;
    b->device = make_device(o);
    b->stream = b->device->make_stream("bench");
    b->start = b->device->make_event();
    b->stop = b->device->make_event();
  }
  return *b;
}

// Device memory holding `n` random normals (scaled) converted to `dtype`.
DeviceBuffer random_buffer(Backend& b, std::size_t n, DType dtype, float scale = 1.0f, std::uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> f(n);
  for (auto& x : f) x = d(rng);
  std::vector<std::uint8_t> host(n * dtype_size(dtype));
  convert(f.data(), DType::f32, host.data(), dtype, n);
  DeviceBuffer buf = b.device->arena().allocate(std::max<std::size_t>(host.size(), 1), "benchmark input");
  b.stream->copy_h2d(buf.data(), host.data(), host.size());
  b.stream->synchronize();
  return buf;
}

template <class T>
DeviceBuffer upload(Backend& b, const std::vector<T>& host) {
  DeviceBuffer buf = b.device->arena().allocate(host.size() * sizeof(T), "benchmark input");
  b.stream->copy_h2d(buf.data(), host.data(), host.size() * sizeof(T));
  b.stream->synchronize();
  return buf;
}

// Times `enqueue` (work on b.stream) per iteration between two events; errors of the
// work surface from the final synchronize().
void timed(benchmark::State& state, Backend& b, const std::function<void()>& enqueue) {
  enqueue();  // warm: cuBLAS handles, scratch, caches
  b.stream->synchronize();
  for (auto _ : state) {
    b.stream->record(*b.start);
    enqueue();
    b.stream->record(*b.stop);
    b.stop->synchronize();
    state.SetIterationTime(std::max(b.stop->seconds_since(*b.start), 1e-9));
  }
  b.stream->synchronize();
}

void rate(benchmark::State& state, const char* name, double per_iteration) {
  state.counters[name] = benchmark::Counter(per_iteration * static_cast<double>(state.iterations()),
                                            benchmark::Counter::kIsRate);
}

// ---- the kernels ----

// y[tokens, out] = x[tokens, in] · W[out, in]ᵀ (a linear layer).
void gemm(benchmark::State& state, DeviceKind kind, DType dtype) {
  Backend& b = backend(kind);
  const std::int64_t tokens = state.range(0), in = state.range(1), out = state.range(2);
  DeviceBuffer x = random_buffer(b, static_cast<std::size_t>(tokens * in), dtype);
  DeviceBuffer w = random_buffer(b, static_cast<std::size_t>(out * in), dtype, 0.02f, 2);
  DeviceBuffer y = random_buffer(b, static_cast<std::size_t>(tokens * out), dtype, 1.0f, 3);
  Ops& ops = b.device->ops();
  timed(state, b, [&] {
    ops.gemm(*b.stream, Mat::dense(x.data(), dtype, tokens, in), false, Mat::dense(w.data(), dtype, out, in), true,
             Mat::dense(y.data(), dtype, tokens, out), 1.0f, 0.0f);
  });
  rate(state, "FLOP/s", 2.0 * static_cast<double>(tokens) * static_cast<double>(in) * static_cast<double>(out));
}

// A linear layer as the graph runs it (Ops::linear): y = relu(x·Wᵀ + b) when relu, else
// h += x·Wᵀ + b (the residual form). On CUDA the bias, ReLU and residual are fused
// into the GEMM (Note [GEMM epilogues]; ZO2_CUDA_GEMM_EPILOGUE=0: separate passes).
void linear(benchmark::State& state, DeviceKind kind, DType dtype) {
  Backend& b = backend(kind);
  const std::int64_t tokens = state.range(0), in = state.range(1), out = state.range(2);
  const bool relu = state.range(3) != 0;
  DeviceBuffer x = random_buffer(b, static_cast<std::size_t>(tokens * in), dtype);
  DeviceBuffer w = random_buffer(b, static_cast<std::size_t>(out * in), dtype, 0.02f, 2);
  DeviceBuffer bias = random_buffer(b, static_cast<std::size_t>(out), dtype, 0.1f, 3);
  DeviceBuffer y = random_buffer(b, static_cast<std::size_t>(tokens * out), dtype, 1.0f, 4);
  DeviceBuffer h = random_buffer(b, static_cast<std::size_t>(tokens * out), dtype, 1.0f, 5);
  const Mat hm = Mat::dense(h.data(), dtype, tokens, out);
  Ops& ops = b.device->ops();
  timed(state, b, [&] {
    ops.linear(*b.stream, Mat::dense(x.data(), dtype, tokens, in), Mat::dense(w.data(), dtype, out, in),
               Mat::dense(y.data(), dtype, tokens, out), bias.data(), relu, relu ? nullptr : &hm);
  });
  rate(state, "FLOP/s", 2.0 * static_cast<double>(tokens) * static_cast<double>(in) * static_cast<double>(out));
}

// Causal self-attention, batch 1, `heads` heads of 64.
void attention(benchmark::State& state, DeviceKind kind, DType dtype) {
  Backend& b = backend(kind);
  const int seq = static_cast<int>(state.range(0)), heads = static_cast<int>(state.range(1)), head_dim = 64;
  const std::int64_t d = static_cast<std::int64_t>(heads) * head_dim;
  DeviceBuffer q = random_buffer(b, static_cast<std::size_t>(seq * d), dtype, 1.0f, 4);
  DeviceBuffer k = random_buffer(b, static_cast<std::size_t>(seq * d), dtype, 1.0f, 5);
  DeviceBuffer v = random_buffer(b, static_cast<std::size_t>(seq * d), dtype, 1.0f, 6);
  DeviceBuffer o = random_buffer(b, static_cast<std::size_t>(seq * d), dtype, 1.0f, 7);
  AttentionArgs a;
  a.q = Mat::dense(q.data(), dtype, seq, d);
  a.k = Mat::dense(k.data(), dtype, seq, d);
  a.v = Mat::dense(v.data(), dtype, seq, d);
  a.out = Mat::dense(o.data(), dtype, seq, d);
  a.batch = 1;
  a.seq = seq;
  a.heads = heads;
  a.kv_heads = heads;
  a.head_dim = head_dim;
  a.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  Ops& ops = b.device->ops();
  timed(state, b, [&] { ops.attention(*b.stream, a); });
  // QKᵀ and PV over the causal half.
  rate(state, "FLOP/s", 2.0 * 2.0 * heads * head_dim * static_cast<double>(seq) * (seq + 1) / 2.0);
}

void norm(benchmark::State& state, DeviceKind kind, DType dtype, bool rms) {
  Backend& b = backend(kind);
  const std::int64_t rows = state.range(0), cols = state.range(1);
  DeviceBuffer x = random_buffer(b, static_cast<std::size_t>(rows * cols), dtype);
  DeviceBuffer y = random_buffer(b, static_cast<std::size_t>(rows * cols), dtype, 1.0f, 2);
  DeviceBuffer w = random_buffer(b, static_cast<std::size_t>(cols), dtype, 1.0f, 3);
  DeviceBuffer bias = random_buffer(b, static_cast<std::size_t>(cols), dtype, 1.0f, 4);
  const Mat mx = Mat::dense(x.data(), dtype, rows, cols), my = Mat::dense(y.data(), dtype, rows, cols);
  Ops& ops = b.device->ops();
  timed(state, b, [&] {
    if (rms)
      ops.rmsnorm(*b.stream, mx, w.data(), 1e-6f, my);
    else
      ops.layernorm(*b.stream, mx, w.data(), bias.data(), 1e-5f, my);
  });
  rate(state, "bytes/s", 2.0 * static_cast<double>(rows * cols) * static_cast<double>(dtype_size(dtype)));
}

// Cross-entropy over fp32 logits [rows, vocab] in tiles of 4096 columns, then the row losses.
void cross_entropy(benchmark::State& state, DeviceKind kind) {
  Backend& b = backend(kind);
  const std::int64_t rows = state.range(0), vocab = state.range(1), tile = 4096;
  DeviceBuffer logits = random_buffer(b, static_cast<std::size_t>(rows * vocab), DType::f32);
  std::vector<std::int32_t> t(static_cast<std::size_t>(rows));
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<std::int32_t>((i * 7919) % static_cast<std::size_t>(vocab));
  DeviceBuffer targets = upload(b, t);
  DeviceBuffer st = b.device->arena().allocate(static_cast<std::size_t>(rows) * 3 * sizeof(float), "ce state");
  DeviceBuffer loss = b.device->arena().allocate(static_cast<std::size_t>(rows) * sizeof(float), "row loss");
  const Mat all = Mat::dense(logits.data(), DType::f32, rows, vocab);
  Ops& ops = b.device->ops();
  timed(state, b, [&] {
    for (std::int64_t c = 0; c < vocab; c += tile)
      ops.ce_accumulate(*b.stream, all.cols_range(c, std::min(vocab, c + tile)), c, targets.as<std::int32_t>(),
                        st.as<float>(), c == 0);
    ops.ce_finish(*b.stream, st.as<float>(), targets.as<std::int32_t>(), rows, loss.as<float>());
  });
  rate(state, "logits/s", static_cast<double>(rows * vocab));
}

// A stored weight [rows, cols] in `storage` (fp8 with per-row scales).
struct Weight {
  DeviceBuffer data, scales;
  StoredTensor t;
};
Weight stored_weight(Backend& b, std::int64_t rows, std::int64_t cols, DType storage) {
  Weight w;
  w.data = random_buffer(b, static_cast<std::size_t>(rows * cols), storage, storage == DType::f8_e4m3 ? 100.0f : 0.02f);
  if (storage == DType::f8_e4m3) w.scales = upload(b, std::vector<float>(static_cast<std::size_t>(rows), 2e-4f));
  w.t = StoredTensor{w.data.data(), storage, w.scales ? w.scales.as<float>() : nullptr, rows, cols, 0x9e3779b97f4a7c15ull};
  return w;
}

// W+ and W− of one [rows, cols] weight into fp32 (what a forward pass needs per tensor).
void perturb(benchmark::State& state, DeviceKind kind, DType storage, DType out) {
  Backend& b = backend(kind);
  const std::int64_t rows = state.range(0), cols = state.range(1);
  Weight w = stored_weight(b, rows, cols, storage);
  const std::size_t out_bytes = static_cast<std::size_t>(rows * cols) * dtype_size(out);
  DeviceBuffer plus = b.device->arena().allocate(out_bytes, "W+"), minus = b.device->arena().allocate(out_bytes, "W-");
  const NoiseArgs noise{1234, 1e-3f};
  Ops& ops = b.device->ops();
  timed(state, b, [&] { ops.perturb(*b.stream, w.t, 0, rows, &noise, plus.data(), minus.data(), out); });
  rate(state, "elements/s", static_cast<double>(rows * cols));
}

// The fused deferred update of one [rows, cols] weight (stochastic rounding below fp32).
void update(benchmark::State& state, DeviceKind kind, DType storage) {
  Backend& b = backend(kind);
  const std::int64_t rows = state.range(0), cols = state.range(1);
  Weight w = stored_weight(b, rows, cols, storage);
  DeviceBuffer g = upload(b, std::vector<float>{0.5f});
  UpdateArgs a;
  a.seed = 99;
  a.lr = 1e-6f;
  a.weight_decay = 0.01f;
  a.g = g.as<float>();
  a.rounding_seed = 7;
  Ops& ops = b.device->ops();
  timed(state, b, [&] { ops.update(*b.stream, w.t, a); });
  rate(state, "elements/s", static_cast<double>(rows * cols));
}

// ---- registration ----

void register_backend(DeviceKind kind) {
  const bool gpu = kind == DeviceKind::cuda;
  const std::string dev(device_kind_name(kind));
  auto reg = [&](const std::string& name, auto fn) {
    return benchmark::RegisterBenchmark(fmt::format("Kernel.{}/{}", name, dev).c_str(), fn)
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  };
  std::vector<DType> compute = {DType::f32};
  if (gpu) compute.push_back(DType::bf16);  // the CPU backend computes in fp32
  for (DType dt : compute) {
    const std::string s(dtype_name(dt));
    auto* g = reg("Gemm." + s, [kind, dt](benchmark::State& st) { gemm(st, kind, dt); });
    g->ArgNames({"tokens", "in", "out"})->Args({128, 768, 768})->Args({128, 768, 3072})->Args({512, 2048, 2048});
    if (gpu) g->Args({2048, 4096, 4096})->Args({2048, 4096, 16384});
    auto* li = reg("Linear." + s, [kind, dt](benchmark::State& st) { linear(st, kind, dt); });
    li->ArgNames({"tokens", "in", "out", "relu"})->Args({128, 768, 3072, 1})->Args({128, 3072, 768, 0});
    if (gpu) li->Args({2048, 4096, 16384, 1})->Args({2048, 16384, 4096, 0});
    auto* at = reg("Attention." + s, [kind, dt](benchmark::State& st) { attention(st, kind, dt); });
    at->ArgNames({"seq", "heads"})->Args({128, 12})->Args({512, 16});
    if (gpu) at->Args({2048, 32});
    for (bool rms : {false, true}) {
      auto* n = reg(std::string(rms ? "RmsNorm." : "LayerNorm.") + s,
                    [kind, dt, rms](benchmark::State& st) { norm(st, kind, dt, rms); });
      n->ArgNames({"rows", "cols"})->Args({128, 768})->Args({2048, 4096});
    }
  }
  auto* ce = reg("CrossEntropyTiles.fp32", [kind](benchmark::State& st) { cross_entropy(st, kind); });
  ce->ArgNames({"rows", "vocab"})->Args({128, 50272});
  if (gpu) ce->Args({2048, 128256});
  for (DType storage : {DType::f32, DType::bf16, DType::f8_e4m3}) {
    const std::string s(dtype_name(storage));
    auto* p = reg("Perturb." + s + "->fp32",
                  [kind, storage](benchmark::State& st) { perturb(st, kind, storage, DType::f32); });
    p->ArgNames({"rows", "cols"})->Args({768, 3072})->Args({64, 768});
    if (gpu) p->Args({4096, 16384});
    auto* u = reg("Update." + s, [kind, storage](benchmark::State& st) { update(st, kind, storage); });
    u->ArgNames({"rows", "cols"})->Args({768, 3072});
    if (gpu) u->Args({4096, 16384});
  }
}

const bool registered = [] {
  register_backend(DeviceKind::cpu);
  if (cuda_device_count() > 0) register_backend(DeviceKind::cuda);
  return true;
}();

}  // namespace
