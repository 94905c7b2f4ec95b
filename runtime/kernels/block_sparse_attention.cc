// edgeprune.BlockSparseAttention on CPU: exact attention of each query block over its selected key
// blocks, with an online (chunked) softmax so only one key block is live at a time.
//
// Inputs  q [B, Hq, S, D], k/v [B, Hkv, T, D] float32 (T >= S: T - S past keys of a KV cache),
//         block_index int64 [B, Hsel, nB, K] with nB = ceil(S / block) query blocks
// Output  y [B, Hq, S, D].  Attributes: block (int), scale (float).
// Semantics match the ONNX function body in passes/sparse_attention/functions.py: query row t sits
// at absolute position T - S + t; key block j holds keys j*block .. (j+1)*block-1 (absolute);
// causal at the token level (key_pos <= query_pos), keys past T ignored; Hsel is Hq (per-head
// selection) or a divisor of it (the Hq/Hsel query heads of a row share its blocks).
//
// edgeprune.DynamicSparseAttention (q, k, v; block, keep, sink, min_len, per_group, scale) is the
// same attention with the block selection done here too (one node instead of the ~130 of the
// function body, which matters for a decode step): pooled-score / Quest-bound selection exactly as
// the function body in functions.py defines it, then the tiles below.
//
// The tile kernel (bsa_tile.inc) is compiled three times below, for AVX-512, AVX2+FMA and
// baseline x86-64, and the widest the CPU supports is picked per call (EDGEPRUNE_KERNEL_ISA=
// avx512|avx2|base forces one, for tests).  Work is split over (batch, selection row, query block)
// units on ORT's intra-op thread pool (KernelContext_ParallelFor, C API 17, ORT >= 1.17); on an
// older ORT the kernel falls back to its own std::thread workers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "ort_abi.h"

using edgeprune_ort::Api;

namespace {

Api g_api;
Api g_api17;  // the same table requested at version 17 (ParallelFor), or empty on an older ORT

struct Shape {
  int64_t b, hq, hkv, s, d, hsel, nb, kk, block, t, nbk;  // t: key length (past + s), nbk: key blocks
};

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // clang lacks #pragma GCC target: baseline only
#define EP_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx2,fma")
namespace isa_avx512 {
#define EP_W 16
#define EP_RT 6
#define EP_CV 4
#include "bsa_tile.inc"
#undef EP_W
#undef EP_RT
#undef EP_CV
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define EP_W 8
#define EP_RT 6
#define EP_CV 2
#include "bsa_tile.inc"
#undef EP_W
#undef EP_RT
#undef EP_CV
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

namespace isa_base {
#define EP_W 4
#define EP_RT 4
#define EP_CV 2
#include "bsa_tile.inc"
#undef EP_W
#undef EP_RT
#undef EP_CV
}  // namespace isa_base

namespace {

using UnitFn = void (*)(void* job, int64_t unit);

struct Job {
  Shape sh;
  float scale;
  const float *q, *k, *v;
  const int64_t* idx;
  const int64_t* kmask;  // [B, T] key mask of the masked ops, or nullptr
  float* y;
};

template <typename Scratch, void (*Run)(int64_t, const Shape&, float, const float*, const float*, const float*,
                                        const int64_t*, const int64_t*, float*, Scratch&)>
void unit_of(void* data, int64_t unit) {
  thread_local Scratch ws;  // per worker thread, reused across calls
  const Job& job = *static_cast<const Job*>(data);
  Run(unit, job.sh, job.scale, job.q, job.k, job.v, job.idx, job.kmask, job.y, ws);
}

UnitFn pick_isa() {
  const char* forced = std::getenv("EDGEPRUNE_KERNEL_ISA");
  const std::string want = forced ? forced : "";
#ifdef EP_X86
  __builtin_cpu_init();
  if ((want.empty() || want == "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
    return unit_of<isa_avx512::Scratch, isa_avx512::run_unit>;
  if ((want.empty() || want == "avx512" || want == "avx2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return unit_of<isa_avx2::Scratch, isa_avx2::run_unit>;
#endif
  return unit_of<isa_base::Scratch, isa_base::run_unit>;
}

struct Dispatch {
  UnitFn fn;
  void* job;
  int64_t units, nb;
};

// Units in decreasing cost: later query blocks see more causal key blocks, so they go first and
// the dynamic schedule ends on cheap units.
inline int64_t unit_at(const Dispatch& d, size_t n) {
  const int64_t row = static_cast<int64_t>(n) / d.nb, i = d.nb - 1 - static_cast<int64_t>(n) % d.nb;
  return row * d.nb + i;
}

void parallel_body(void* data, size_t n) {
  const Dispatch& d = *static_cast<const Dispatch*>(data);
  d.fn(d.job, unit_at(d, n));
}

static int thread_count(int64_t units) {
  int n = static_cast<int>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("EDGEPRUNE_KERNEL_THREADS")) n = std::atoi(env);
  n = std::max(1, n);
  return static_cast<int>(std::min<int64_t>(n, units));
}

struct Kernel {
  int64_t block = 64;
  float scale = 1.0f;
  bool masked = false;  // the *Masked op: one more input, the [B, T] key mask
};

static std::vector<int64_t> dims_of(const OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  std::vector<int64_t> dims;
  if (OrtStatus* st = g_api.GetTensorTypeAndShape(value, &info)) {
    g_api.ReleaseStatus(st);
    return dims;
  }
  size_t n = 0;
  if (OrtStatus* st = g_api.GetDimensionsCount(info, &n)) g_api.ReleaseStatus(st);
  dims.resize(n);
  if (OrtStatus* st = g_api.GetDimensions(info, dims.data(), n)) g_api.ReleaseStatus(st);
  g_api.ReleaseTensorTypeAndShapeInfo(info);
  return dims;
}

static void* data_of(const OrtValue* value) {
  void* p = nullptr;
  if (OrtStatus* st = g_api.GetTensorMutableData(const_cast<OrtValue*>(value), &p)) {
    g_api.ReleaseStatus(st);
    return nullptr;
  }
  return p;
}

void* create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info) {
  auto* kernel = new Kernel();
  if (OrtStatus* st = g_api.KernelInfoGetAttribute_int64(info, "block", &kernel->block)) g_api.ReleaseStatus(st);
  if (OrtStatus* st = g_api.KernelInfoGetAttribute_float(info, "scale", &kernel->scale)) g_api.ReleaseStatus(st);
  if (kernel->block < 1) kernel->block = 64;
  return kernel;
}

struct DynKernel {
  int64_t block = 64, sink = 1, min_len = 0, per_group = 1;
  float keep = 0.25f, scale = 1.0f;
  bool masked = false;
};

// Units on ORT's intra-op pool (num_batch 0: one task per unit, taken dynamically), or on our own
// std::thread workers before ORT 1.17.
void parallel_for(OrtKernelContext* context, void (*fn)(void*, size_t), size_t total, void* data) {
  if (g_api17.table != nullptr) {
    if (OrtStatus* st = g_api17.KernelContext_ParallelFor(context, fn, total, 0, data)) {
      g_api.ReleaseStatus(st);
      for (size_t u = 0; u < total; ++u) fn(data, u);
    }
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t u = next.fetch_add(1); u < static_cast<int64_t>(total); u = next.fetch_add(1)) fn(data, static_cast<size_t>(u));
  };
  const int threads = thread_count(static_cast<int64_t>(total));
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

void compute(void* op_kernel, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(op_kernel);
  const OrtValue* in[5] = {};
  for (size_t n = 0; n < (kernel.masked ? 5u : 4u); ++n)
    if (OrtStatus* st = g_api.KernelContext_GetInput(context, n, &in[n])) g_api.ReleaseStatus(st);
  const auto qd = dims_of(in[0]), kd = dims_of(in[1]), id = dims_of(in[3]);
  OrtValue* out = nullptr;
  if (OrtStatus* st = g_api.KernelContext_GetOutput(context, 0, qd.data(), qd.size(), &out)) {
    g_api.ReleaseStatus(st);
    return;
  }
  float* y = static_cast<float*>(data_of(out));
  if (qd.size() != 4 || kd.size() != 4 || id.size() != 4 || y == nullptr) return;
  Shape sh{qd[0], qd[1], kd[1], qd[2], qd[3], id[1], id[2], id[3], kernel.block, kd[2], (kd[2] + kernel.block - 1) / kernel.block};
  const bool ok = sh.hkv > 0 && sh.hsel > 0 && sh.hq % sh.hsel == 0 && sh.hsel % sh.hkv == 0 &&
                  sh.nb == (sh.s + sh.block - 1) / sh.block && sh.t >= sh.s && kd[3] == sh.d && id[0] == sh.b;
  if (!ok) {  // shapes the function body would also reject; the pass never emits them
    if (qd.size() == 4) std::fill(y, y + qd[0] * qd[1] * qd[2] * qd[3], 0.0f);
    return;
  }
  const float* q = static_cast<const float*>(data_of(in[0]));
  const float* k = static_cast<const float*>(data_of(in[1]));
  const float* v = static_cast<const float*>(data_of(in[2]));
  const int64_t* idx = static_cast<const int64_t*>(data_of(in[3]));
  const int64_t units = sh.b * sh.hsel * sh.nb;
  const int64_t* kmask = kernel.masked ? static_cast<const int64_t*>(data_of(in[4])) : nullptr;
  if (kernel.masked && dims_of(in[4]) != std::vector<int64_t>{sh.b, sh.t}) {
    std::fill(y, y + qd[0] * qd[1] * qd[2] * qd[3], 0.0f);
    return;
  }
  Job job{sh, kernel.scale, q, k, v, idx, kmask, y};
  Dispatch dispatch{pick_isa(), &job, units, sh.nb};
  parallel_for(context, parallel_body, static_cast<size_t>(units), &dispatch);
}

void* create_dyn(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info) {
  auto* kernel = new DynKernel();
  int64_t* ints[] = {&kernel->block, &kernel->sink, &kernel->min_len, &kernel->per_group};
  const char* int_names[] = {"block", "sink", "min_len", "per_group"};
  for (int n = 0; n < 4; ++n)
    if (OrtStatus* st = g_api.KernelInfoGetAttribute_int64(info, int_names[n], ints[n])) g_api.ReleaseStatus(st);
  if (OrtStatus* st = g_api.KernelInfoGetAttribute_float(info, "keep", &kernel->keep)) g_api.ReleaseStatus(st);
  if (OrtStatus* st = g_api.KernelInfoGetAttribute_float(info, "scale", &kernel->scale)) g_api.ReleaseStatus(st);
  if (kernel->block < 1) kernel->block = 64;
  return kernel;
}

// Per-key-block statistics of one (batch, KV head): the sum for prefill scores, or the element-wise
// min and max for a decode step's Quest bound.  Zero padding past T counts, as in the function body
// (the last, partial block is always forced in, so its score is never used).
struct StatsJob {
  const float* k;
  const int64_t* kmask;  // [B, T] or nullptr: masked keys count as zero vectors
  int64_t hkv;
  int64_t t, d, block, nbk;
  bool decode;
  float *sum, *mn, *mx;  // [B*Hkv, nbk, d]
};

void stats_unit(void* data, size_t n) {
  const StatsJob& j = *static_cast<const StatsJob*>(data);
  const int64_t row = static_cast<int64_t>(n) / j.nbk, blk = static_cast<int64_t>(n) % j.nbk;
  const float* base = j.k + (row * j.t + blk * j.block) * j.d;
  const int64_t kn = std::min(j.block, j.t - blk * j.block);
  const int64_t off = (row * j.nbk + blk) * j.d;
  const int64_t* mrow = j.kmask ? j.kmask + (row / j.hkv) * j.t + blk * j.block : nullptr;
  if (mrow != nullptr) {  // the rare masked block: zero vectors for its masked keys
    int64_t kept = 0;
    for (int64_t c = 0; c < kn; ++c) kept += mrow[c] != 0;
    if (kept < kn) {
      float* sum = j.decode ? nullptr : j.sum + off;
      float* mn = j.decode ? j.mn + off : nullptr;
      float* mx = j.decode ? j.mx + off : nullptr;
      for (int64_t e = 0; e < j.d; ++e) {
        if (sum) sum[e] = 0.0f;
        if (mn) mn[e] = mx[e] = 0.0f;  // a zero vector is in the block (padding or a masked key)
      }
      bool first = true;
      for (int64_t c = 0; c < kn; ++c) {
        if (mrow[c] == 0) continue;
        for (int64_t e = 0; e < j.d; ++e) {
          const float x = base[c * j.d + e];
          if (sum) sum[e] += x;
          if (mn) {
            mn[e] = x < mn[e] ? x : mn[e];
            mx[e] = x > mx[e] ? x : mx[e];
          }
        }
        first = false;
      }
      (void)first;
      return;
    }
  }
  if (j.decode) {
    float* mn = j.mn + off;
    float* mx = j.mx + off;
    for (int64_t e = 0; e < j.d; ++e) mn[e] = mx[e] = base[e];
    for (int64_t c = 1; c < kn; ++c)
      for (int64_t e = 0; e < j.d; ++e) {
        const float x = base[c * j.d + e];
        mn[e] = x < mn[e] ? x : mn[e];
        mx[e] = x > mx[e] ? x : mx[e];
      }
    if (kn < j.block)
      for (int64_t e = 0; e < j.d; ++e) {
        mn[e] = std::min(mn[e], 0.0f);
        mx[e] = std::max(mx[e], 0.0f);
      }
  } else {
    float* sum = j.sum + off;
    for (int64_t e = 0; e < j.d; ++e) sum[e] = 0.0f;
    for (int64_t c = 0; c < kn; ++c)
      for (int64_t e = 0; e < j.d; ++e) sum[e] += base[c * j.d + e];
  }
}

// The block choice of DynamicSparseAttention (functions.py): int64 [B, Hsel, nB, K], sorted.
std::vector<int64_t> select_blocks(OrtKernelContext* context, const DynKernel& kn, const Shape& sh, const float* q,
                                   const float* k, const int64_t* kmask) {
  const int64_t block = sh.block, d = sh.d, s = sh.s, t = sh.t, nb = sh.nb, nbk = sh.nbk, kk = sh.kk;
  const int64_t qblk = std::min(block, s), past = t - s, r = sh.hq / sh.hsel;
  const bool decode = s < block;
  std::vector<float> sum, mn, mx;
  (decode ? mn : sum).assign(sh.b * sh.hkv * nbk * d, 0.0f);
  if (decode) mx.assign(mn.size(), 0.0f);
  StatsJob job{k, kmask, sh.hkv, t, d, block, nbk, decode, sum.data(), mn.data(), mx.data()};
  parallel_for(context, stats_unit, static_cast<size_t>(sh.b * sh.hkv * nbk), &job);
  // Pooled queries per query head and query block (summed rows, zero padding adds nothing).
  std::vector<float> pq(sh.b * sh.hq * nb * d, 0.0f);
  for (int64_t bh = 0; bh < sh.b * sh.hq; ++bh)
    for (int64_t row = 0; row < s; ++row) {
      float* dst = pq.data() + (bh * nb + row / qblk) * d;
      const float* src = q + (bh * s + row) * d;
      for (int64_t e = 0; e < d; ++e) dst[e] += src[e];
    }
  std::vector<int64_t> index(sh.b * sh.hsel * nb * kk);
  std::vector<float> score(nbk);
  std::vector<int64_t> order(nbk);
  std::vector<float> row_q(d);
  for (int64_t b = 0; b < sh.b; ++b)
    for (int64_t hs = 0; hs < sh.hsel; ++hs) {
      const int64_t hk = hs * sh.hkv / sh.hsel;
      for (int64_t i = 0; i < nb; ++i) {
        if (decode) {  // Quest: per query head sum_d max(q*kmin, q*kmax), summed over the row's heads
          for (int64_t j = 0; j < nbk; ++j) score[j] = 0.0f;
          for (int64_t h = hs * r; h < hs * r + r; ++h) {
            const float* pqh = pq.data() + ((b * sh.hq + h) * nb + nb - 1) * d;
            for (int64_t j = 0; j < nbk; ++j) {
              const float* lo = mn.data() + ((b * sh.hkv + hk) * nbk + j) * d;
              const float* hi = mx.data() + ((b * sh.hkv + hk) * nbk + j) * d;
              float acc = 0.0f;
              for (int64_t e = 0; e < d; ++e) acc += std::max(pqh[e] * lo[e], pqh[e] * hi[e]);
              score[j] += acc;
            }
          }
        } else {  // pooled query block (summed over the row's heads) . pooled key block
          for (int64_t e = 0; e < d; ++e) row_q[e] = 0.0f;
          for (int64_t h = hs * r; h < hs * r + r; ++h) {
            const float* pqh = pq.data() + ((b * sh.hq + h) * nb + i) * d;
            for (int64_t e = 0; e < d; ++e) row_q[e] += pqh[e];
          }
          for (int64_t j = 0; j < nbk; ++j) {
            const float* pk = sum.data() + ((b * sh.hkv + hk) * nbk + j) * d;
            float acc = 0.0f;
            for (int64_t e = 0; e < d; ++e) acc += row_q[e] * pk[e];
            score[j] = acc;
          }
        }
        const int64_t lo_blk = (past + i * qblk) / block;
        const int64_t hi_blk = (past + std::min((i + 1) * qblk, s) - 1) / block;
        for (int64_t j = 0; j < nbk; ++j) {
          if ((j >= lo_blk && j <= hi_blk) || j < kn.sink) score[j] = 1e30f;
          if (j > hi_blk) score[j] = -1e30f;
          order[j] = j;
        }
        // TopK (ties: the lower block first, as ORT's TopK), then ascending block order.
        std::partial_sort(order.begin(), order.begin() + kk, order.end(), [&](int64_t a, int64_t c) {
          return score[a] > score[c] || (score[a] == score[c] && a < c);
        });
        int64_t* dst = index.data() + ((b * sh.hsel + hs) * nb + i) * kk;
        std::copy(order.begin(), order.begin() + kk, dst);
        std::sort(dst, dst + kk);
      }
    }
  return index;
}

void compute_dyn(void* op_kernel, OrtKernelContext* context) {
  const DynKernel& kernel = *static_cast<DynKernel*>(op_kernel);
  const OrtValue* in[4] = {};
  for (size_t n = 0; n < (kernel.masked ? 4u : 3u); ++n)
    if (OrtStatus* st = g_api.KernelContext_GetInput(context, n, &in[n])) g_api.ReleaseStatus(st);
  const auto qd = dims_of(in[0]), kd = dims_of(in[1]);
  OrtValue* out = nullptr;
  if (OrtStatus* st = g_api.KernelContext_GetOutput(context, 0, qd.data(), qd.size(), &out)) {
    g_api.ReleaseStatus(st);
    return;
  }
  float* y = static_cast<float*>(data_of(out));
  if (qd.size() != 4 || kd.size() != 4 || y == nullptr) return;
  const int64_t block = kernel.block, s = qd[2], t = kd[2];
  const int64_t g = kd[1] > 0 ? qd[1] / kd[1] : 0;
  const int64_t r = kernel.per_group ? g : 1;
  const bool ok = s > 0 && kd[1] > 0 && qd[1] % kd[1] == 0 && t >= s && kd[3] == qd[3] && kd[0] == qd[0] && r > 0;
  if (!ok) {  // shapes the function body would also reject; the pass never emits them
    if (qd.size() == 4) std::fill(y, y + qd[0] * qd[1] * qd[2] * qd[3], 0.0f);
    return;
  }
  const int64_t qblk = std::min(block, s), nb = (s + qblk - 1) / qblk, nbk = (t + block - 1) / block;
  const int64_t past = t - s;
  const int64_t extra = (past % block + qblk > block) ? 1 : 0;
  int64_t kk = nbk;
  if (t >= kernel.min_len) {
    const int64_t want = static_cast<int64_t>(std::ceil(static_cast<float>(nbk) * kernel.keep));
    kk = std::min(std::max(want, kernel.sink + 1 + extra), nbk);
  }
  Shape sh{qd[0], qd[1], kd[1], s, qd[3], qd[1] / r, nb, kk, block, t, nbk};
  const float* q = static_cast<const float*>(data_of(in[0]));
  const float* k = static_cast<const float*>(data_of(in[1]));
  const float* v = static_cast<const float*>(data_of(in[2]));
  const int64_t* kmask = kernel.masked ? static_cast<const int64_t*>(data_of(in[3])) : nullptr;
  if (kernel.masked && dims_of(in[3]) != std::vector<int64_t>{sh.b, sh.t}) {
    std::fill(y, y + qd[0] * qd[1] * qd[2] * qd[3], 0.0f);
    return;
  }
  const std::vector<int64_t> index = select_blocks(context, kernel, sh, q, k, kmask);
  Job job{sh, kernel.scale, q, k, v, index.data(), kmask, y};
  Dispatch dispatch{pick_isa(), &job, sh.b * sh.hsel * sh.nb, sh.nb};
  parallel_for(context, parallel_body, static_cast<size_t>(dispatch.units), &dispatch);
}

void destroy_dyn(void* op_kernel) { delete static_cast<DynKernel*>(op_kernel); }
const char* dyn_name(const OrtCustomOp*) { return "DynamicSparseAttention"; }
ONNXTensorElementDataType dyn_input_type(const OrtCustomOp*, size_t index) { return index == 3 ? ORT_INT64 : ORT_FLOAT; }
size_t dyn_input_count(const OrtCustomOp*) { return 3; }
// The *Masked ops: the same kernels with the model's [B, T] int64 attention_mask as the last input.
void* create_dyn_masked(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  auto* kernel = static_cast<DynKernel*>(create_dyn(op, api, info));
  kernel->masked = true;
  return kernel;
}
const char* dyn_masked_name(const OrtCustomOp*) { return "DynamicSparseAttentionMasked"; }
size_t dyn_masked_input_count(const OrtCustomOp*) { return 4; }
void* create_kernel_masked(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info) {
  auto* kernel = static_cast<Kernel*>(create_kernel(op, api, info));
  kernel->masked = true;
  return kernel;
}
const char* op_masked_name(const OrtCustomOp*) { return "BlockSparseAttentionMasked"; }
ONNXTensorElementDataType masked_input_type(const OrtCustomOp*, size_t index) { return index >= 3 ? ORT_INT64 : ORT_FLOAT; }
size_t masked_input_count(const OrtCustomOp*) { return 5; }

void destroy(void* op_kernel) { delete static_cast<Kernel*>(op_kernel); }
const char* op_name(const OrtCustomOp*) { return "BlockSparseAttention"; }
const char* op_ep(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType input_type(const OrtCustomOp*, size_t index) { return index == 3 ? ORT_INT64 : ORT_FLOAT; }
size_t input_count(const OrtCustomOp*) { return 4; }
ONNXTensorElementDataType output_type(const OrtCustomOp*, size_t) { return ORT_FLOAT; }
size_t output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic required(const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; }
OrtMemType mem_default(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }

OrtCustomOp g_op = {edgeprune_ort::kApiVersion, create_kernel, op_name, op_ep, input_type, input_count,
                    output_type, output_count, compute, destroy, required, required, mem_default};
OrtCustomOp g_dyn = {edgeprune_ort::kApiVersion, create_dyn, dyn_name, op_ep, dyn_input_type, dyn_input_count,
                     output_type, output_count, compute_dyn, destroy_dyn, required, required, mem_default};
OrtCustomOp g_dyn_masked = {edgeprune_ort::kApiVersion, create_dyn_masked, dyn_masked_name, op_ep, dyn_input_type,
                            dyn_masked_input_count, output_type, output_count, compute_dyn, destroy_dyn, required, required,
                            mem_default};
OrtCustomOp g_op_masked = {edgeprune_ort::kApiVersion, create_kernel_masked, op_masked_name, op_ep, masked_input_type,
                           masked_input_count, output_type, output_count, compute, destroy, required, required, mem_default};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                              const OrtApiBase* base) {
  g_api.table = base->GetApi(edgeprune_ort::kApiVersion);
  if (g_api.table == nullptr) {
    // Too old for the version-13 op layout; version 1 still has CreateStatus in slot 0.
    Api old{base->GetApi(1)};
    if (old.table == nullptr) return nullptr;
    return old.CreateStatus(ORT_FAIL, "the edgeprune sparse-attention kernel needs onnxruntime >= 1.13 (C API 13)");
  }
  g_api17.table = base->GetApi(edgeprune_ort::kParallelForVersion);  // nullptr before ORT 1.17
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = g_api.CreateCustomOpDomain("edgeprune", &domain)) return st;
  if (OrtStatus* st = g_api.CustomOpDomain_Add(domain, &g_op)) return st;
  if (OrtStatus* st = g_api.CustomOpDomain_Add(domain, &g_dyn)) return st;
  if (OrtStatus* st = g_api.CustomOpDomain_Add(domain, &g_dyn_masked)) return st;
  if (OrtStatus* st = g_api.CustomOpDomain_Add(domain, &g_op_masked)) return st;
  return g_api.AddCustomOpDomain(options, domain);
}
