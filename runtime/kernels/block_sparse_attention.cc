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
  float* y;
};

template <typename Scratch, void (*Run)(int64_t, const Shape&, float, const float*, const float*, const float*,
                                        const int64_t*, float*, Scratch&)>
void unit_of(void* data, int64_t unit) {
  thread_local Scratch ws;  // per worker thread, reused across calls
  const Job& job = *static_cast<const Job*>(data);
  Run(unit, job.sh, job.scale, job.q, job.k, job.v, job.idx, job.y, ws);
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
  Job job{sh, kernel.scale, q, k, v, idx, y};
  Dispatch dispatch{pick_isa(), &job, units, sh.nb};
  if (g_api17.table != nullptr) {
    // num_batch 0: one task per unit, taken dynamically by ORT's intra-op pool (its thread count).
    if (OrtStatus* st = g_api17.KernelContext_ParallelFor(context, parallel_body, static_cast<size_t>(units), 0, &dispatch)) {
      g_api.ReleaseStatus(st);
      for (int64_t u = 0; u < units; ++u) parallel_body(&dispatch, static_cast<size_t>(u));
    }
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) parallel_body(&dispatch, static_cast<size_t>(u));
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
  g_api17.table = base->GetApi(edgeprune_ort::kParallelForVersion);  // nullptr before ORT 1.17
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = g_api.CreateCustomOpDomain("edgeprune", &domain)) return st;
  if (OrtStatus* st = g_api.CustomOpDomain_Add(domain, &g_op)) return st;
  return g_api.AddCustomOpDomain(options, domain);
}
