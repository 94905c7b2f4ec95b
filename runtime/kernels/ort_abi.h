// edgeprune's own declaration of the few ONNX Runtime C API entries the sparse-attention kernel
// calls.  No ORT package on PyPI ships onnxruntime_c_api.h, so instead of copying it we declare
// the OrtApi function table as an array of pointers and name only the slots we use.  The table
// only ever appends entries, so a slot's position is a stable fact; the positions below were
// counted in the public C API header (API version 13) and every one of them exists since
// version 1, except KernelContext_ParallelFor (slot 274, "\since Version 1.17"), which the kernel
// asks for with GetApi(17) and uses only when that returns a table.  The OrtCustomOp struct is
// laid out as at version 13 (its fields too only grow).
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {
struct OrtStatus;
struct OrtValue;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtTensorTypeAndShapeInfo;
struct OrtApi;  // opaque: read as an array of function pointers below

enum ONNXTensorElementDataType { ORT_FLOAT = 1, ORT_INT64 = 7 };
enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum OrtCustomOpInputOutputCharacteristic { INPUT_OUTPUT_REQUIRED = 0, INPUT_OUTPUT_OPTIONAL = 1 };
enum OrtMemType { OrtMemTypeDefault = 0 };

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

struct OrtCustomOp {  // version 13 layout
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const OrtCustomOp* op, size_t index);
};
}

namespace edgeprune_ort {

constexpr uint32_t kApiVersion = 13;  // the OrtCustomOp layout above; ORT >= 1.13
constexpr uint32_t kParallelForVersion = 17;  // KernelContext_ParallelFor; ORT >= 1.17

// Slot numbers in the OrtApi table (0-based, counted from CreateStatus).
enum Slot : int {
  kCreateStatus = 0,
  kCreateCustomOpDomain = 26,
  kCustomOpDomain_Add = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttribute_float = 85,
  kKernelInfoGetAttribute_int64 = 86,
  kKernelContext_GetInput = 90,
  kKernelContext_GetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContext_ParallelFor = 274,  // API 17
};

struct Api {
  const OrtApi* table = nullptr;
  template <typename Fn>
  Fn at(Slot slot) const { return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(table)[slot]); }

  OrtStatus* CreateStatus(OrtErrorCode code, const char* msg) const {
    return at<OrtStatus* (*)(OrtErrorCode, const char*)>(kCreateStatus)(code, msg);
  }
  OrtStatus* CreateCustomOpDomain(const char* domain, OrtCustomOpDomain** out) const {
    return at<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(domain, out);
  }
  OrtStatus* CustomOpDomain_Add(OrtCustomOpDomain* d, const OrtCustomOp* op) const {
    return at<OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*)>(kCustomOpDomain_Add)(d, op);
  }
  OrtStatus* AddCustomOpDomain(OrtSessionOptions* o, OrtCustomOpDomain* d) const {
    return at<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(o, d);
  }
  OrtStatus* GetTensorMutableData(OrtValue* v, void** out) const {
    return at<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(v, out);
  }
  OrtStatus* GetDimensionsCount(const OrtTensorTypeAndShapeInfo* i, size_t* out) const {
    return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(kGetDimensionsCount)(i, out);
  }
  OrtStatus* GetDimensions(const OrtTensorTypeAndShapeInfo* i, int64_t* dims, size_t n) const {
    return at<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(kGetDimensions)(i, dims, n);
  }
  OrtStatus* GetTensorTypeAndShape(const OrtValue* v, OrtTensorTypeAndShapeInfo** out) const {
    return at<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(kGetTensorTypeAndShape)(v, out);
  }
  OrtStatus* KernelInfoGetAttribute_float(const OrtKernelInfo* i, const char* name, float* out) const {
    return at<OrtStatus* (*)(const OrtKernelInfo*, const char*, float*)>(kKernelInfoGetAttribute_float)(i, name, out);
  }
  OrtStatus* KernelInfoGetAttribute_int64(const OrtKernelInfo* i, const char* name, int64_t* out) const {
    return at<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(kKernelInfoGetAttribute_int64)(i, name, out);
  }
  OrtStatus* KernelContext_GetInput(const OrtKernelContext* c, size_t index, const OrtValue** out) const {
    return at<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kKernelContext_GetInput)(c, index, out);
  }
  OrtStatus* KernelContext_GetOutput(OrtKernelContext* c, size_t index, const int64_t* dims, size_t n,
                                     OrtValue** out) const {
    return at<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
        kKernelContext_GetOutput)(c, index, dims, n, out);
  }
  OrtStatus* KernelContext_ParallelFor(const OrtKernelContext* c, void (*fn)(void*, size_t), size_t total,
                                       size_t num_batch, void* data) const {
    return at<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
        kKernelContext_ParallelFor)(c, fn, total, num_batch, data);
  }
  void ReleaseStatus(OrtStatus* s) const { at<void (*)(OrtStatus*)>(kReleaseStatus)(s); }
  void ReleaseTensorTypeAndShapeInfo(OrtTensorTypeAndShapeInfo* i) const {
    at<void (*)(OrtTensorTypeAndShapeInfo*)>(kReleaseTensorTypeAndShapeInfo)(i);
  }
};

}  // namespace edgeprune_ort
