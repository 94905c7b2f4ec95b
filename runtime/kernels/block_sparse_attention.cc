// edgeprune.BlockSparseAttention on CPU: exact attention of each query block over its selected key
// blocks, with an online (chunked) softmax so only one 64-key block is live at a time.
//
// Inputs  q [B, Hq, S, D], k/v [B, Hkv, S, D] float32, block_index int64 [B, Hsel, nB, K]
// Output  y [B, Hq, S, D].  Attributes: block (int), scale (float).
// Semantics match the ONNX function body in passes/sparse_attention/functions.py: causal at the
// token level (key_pos <= query_pos), keys past S ignored; Hsel is Hq (per-head selection) or a
// divisor of it (the Hq/Hsel query heads of a row share its blocks).  The hot loop is compiled for
// AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (GCC target_clones), so one
// shipped build runs everywhere.  Threads: std::thread workers over (batch, row, query block)
// units; EDGEPRUNE_KERNEL_THREADS overrides the count (default: hardware threads).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "ort_abi.h"

using edgeprune_ort::Api;

namespace {

Api g_api;

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define EP_MULTIVERSION __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define EP_MULTIVERSION
#endif

// exp(x) for x <= 0 by 2^n * p(f); vectorizes (no libm call), relative error ~2e-7.
static inline float fast_exp(float x) {
  x = std::max(x, -87.0f);
  float t = x * 1.44269504088896341f;
  float n = std::floor(t);
  float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

struct Shape {
  int64_t b, hq, hkv, s, d, hsel, nb, kk, block;
};

// One query row against one key block (kn valid keys, the first `limit` of them causal-visible).
EP_MULTIVERSION
static void row_block(const float* __restrict q, const float* __restrict kt, const float* __restrict vb,
                      int64_t d, int64_t block, int64_t limit, float scale, float* __restrict s,
                      float* __restrict acc, float* m, float* l) {
  for (int64_t c = 0; c < block; ++c) s[c] = 0.0f;
  for (int64_t e = 0; e < d; ++e) {
    const float qe = q[e] * scale;
    const float* row = kt + e * block;
    for (int64_t c = 0; c < block; ++c) s[c] += qe * row[c];
  }
  float mx = *m;
  for (int64_t c = 0; c < limit; ++c) mx = std::max(mx, s[c]);
  const float alpha = fast_exp(*m - mx);
  float sum = 0.0f;
  for (int64_t c = 0; c < limit; ++c) {
    s[c] = fast_exp(s[c] - mx);
    sum += s[c];
  }
  for (int64_t e = 0; e < d; ++e) acc[e] *= alpha;
  for (int64_t c = 0; c < limit; ++c) {
    const float p = s[c];
    const float* vr = vb + c * d;
    for (int64_t e = 0; e < d; ++e) acc[e] += p * vr[e];
  }
  *l = *l * alpha + sum;
  *m = mx;
}

static void run_unit(int64_t unit, const Shape& sh, float scale, const float* q, const float* k, const float* v,
                     const int64_t* idx, float* y, std::vector<float>& kt, std::vector<float>& sbuf,
                     std::vector<float>& acc) {
  const int64_t i = unit % sh.nb;
  const int64_t hs = (unit / sh.nb) % sh.hsel;
  const int64_t b = unit / (sh.nb * sh.hsel);
  const int64_t r = sh.hq / sh.hsel;
  const int64_t hk = hs * sh.hkv / sh.hsel;
  const int64_t q0 = i * sh.block, q1 = std::min(q0 + sh.block, sh.s);
  const int64_t rows = q1 - q0;
  if (rows <= 0) return;
  const float* kbase = k + (b * sh.hkv + hk) * sh.s * sh.d;
  const float* vbase = v + (b * sh.hkv + hk) * sh.s * sh.d;
  const int64_t* sel = idx + ((b * sh.hsel + hs) * sh.nb + i) * sh.kk;
  const int64_t nrows = r * rows;
  acc.assign(nrows * sh.d, 0.0f);
  std::vector<float> m(nrows, -3.0e38f), l(nrows, 0.0f);
  for (int64_t t = 0; t < sh.kk; ++t) {
    const int64_t j = sel[t];
    if (j < 0 || j > i || j >= sh.nb) continue;  // future blocks are fully masked
    const int64_t k0 = j * sh.block;
    const int64_t kn = std::min(sh.block, sh.s - k0);
    if (kn <= 0) continue;
    std::fill(kt.begin(), kt.end(), 0.0f);
    for (int64_t c = 0; c < kn; ++c)
      for (int64_t e = 0; e < sh.d; ++e) kt[e * sh.block + c] = kbase[(k0 + c) * sh.d + e];
    const float* vb = vbase + k0 * sh.d;
    for (int64_t hr = 0; hr < r; ++hr) {
      const int64_t h = hs * r + hr;
      const float* qh = q + ((b * sh.hq + h) * sh.s) * sh.d;
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t qpos = q0 + row;
        const int64_t limit = std::min(kn, qpos - k0 + 1);
        if (limit <= 0) continue;
        const int64_t slot = hr * rows + row;
        row_block(qh + qpos * sh.d, kt.data(), vb, sh.d, sh.block, limit, scale, sbuf.data(),
                  acc.data() + slot * sh.d, &m[slot], &l[slot]);
      }
    }
  }
  for (int64_t hr = 0; hr < r; ++hr) {
    const int64_t h = hs * r + hr;
    float* yh = y + ((b * sh.hq + h) * sh.s) * sh.d;
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t slot = hr * rows + row;
      const float inv = l[slot] > 0.0f ? 1.0f / l[slot] : 0.0f;
      for (int64_t e = 0; e < sh.d; ++e) yh[(q0 + row) * sh.d + e] = acc[slot * sh.d + e] * inv;
    }
  }
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

void compute(void* op_kernel, OrtKernelContext* context) {
  const Kernel& kernel = *static_cast<Kernel*>(op_kernel);
  const OrtValue* in[4] = {};
  for (size_t n = 0; n < 4; ++n)
    if (OrtStatus* st = g_api.KernelContext_GetInput(context, n, &in[n])) g_api.ReleaseStatus(st);
  const auto qd = dims_of(in[0]), kd = dims_of(in[1]), id = dims_of(in[3]);
  OrtValue* out = nullptr;
  if (OrtStatus* st = g_api.KernelContext_GetOutput(context, 0, qd.data(), qd.size(), &out)) {
    g_api.ReleaseStatus(st);
    return;
  }
  float* y = static_cast<float*>(data_of(out));
  if (qd.size() != 4 || kd.size() != 4 || id.size() != 4 || y == nullptr) return;
  Shape sh{qd[0], qd[1], kd[1], qd[2], qd[3], id[1], id[2], id[3], kernel.block};
  const size_t total = static_cast<size_t>(sh.b * sh.hq * sh.s * sh.d);
  std::fill(y, y + total, 0.0f);
  const bool ok = sh.hkv > 0 && sh.hsel > 0 && sh.hq % sh.hsel == 0 && sh.hsel % sh.hkv == 0 &&
                  sh.nb == (sh.s + sh.block - 1) / sh.block && kd[2] == sh.s && kd[3] == sh.d && id[0] == sh.b;
  if (!ok) return;  // shapes the function body would also reject; the pass never emits them
  const float* q = static_cast<const float*>(data_of(in[0]));
  const float* k = static_cast<const float*>(data_of(in[1]));
  const float* v = static_cast<const float*>(data_of(in[2]));
  const int64_t* idx = static_cast<const int64_t*>(data_of(in[3]));
  const int64_t units = sh.b * sh.hsel * sh.nb;
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> kt(sh.d * sh.block), sbuf(sh.block), acc;
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1))
      run_unit(u, sh, kernel.scale, q, k, v, idx, y, kt, sbuf, acc);
  };
  const int threads = thread_count(units);
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
}

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
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = g_api.CreateCustomOpDomain("edgeprune", &domain)) return st;
  if (OrtStatus* st = g_api.CustomOpDomain_Add(domain, &g_op)) return st;
  return g_api.AddCustomOpDomain(options, domain);
}
