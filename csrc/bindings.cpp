// esper_kernels._C: the pybind11 module. Plain integers and floats in (data pointers, strides, sizes, dtype
// codes, config), nothing of torch: the extension never includes torch headers nor links libtorch, so a
// PyTorch upgrade cannot break it. esper_kernels/backends/native.py encodes a call (encode_call) in exactly
// the order decode() reads it; decode() checks the lengths.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "ppo_cpu.h"
#include "ppo_metrics.h"
#include "ppo_params.h"
#ifdef ESPER_WITH_CUDA
#include "ppo_cuda.h"
#endif

namespace py = pybind11;
using namespace esper;

namespace {

constexpr int INTS_SCALAR = 12;  // n .. has_jclamp
constexpr int INTS_PER_HEAD = 19;
constexpr int INTS_TAIL = 5 * 3 + 6 + 3 + 4 + 4 + 1;  // step vectors, outputs, grad_losses, 2 mats, grad_values
constexpr int FLOATS_SCALAR = 8;

struct Reader {
  const std::vector<int64_t>& v;
  size_t i = 0;
  int64_t next() { return v.at(i++); }
  Vec vec() {
    Vec x;
    x.ptr = (uintptr_t)next();
    x.stride = next();
    x.dtype = (int32_t)next();
    x.pad_ = 0;
    return x;
  }
  Mat mat() {
    Mat x;
    x.ptr = (uintptr_t)next();
    x.stride0 = next();
    x.stride1 = next();
    x.dtype = (int32_t)next();
    x.pad_ = 0;
    return x;
  }
};

PPOParams decode(const std::vector<int64_t>& ints, const std::vector<double>& floats) {
  if (ints.size() < 2) throw std::invalid_argument("esper_kernels._C: empty call");
  const int64_t H = ints[1];
  if (H < 1 || H > ESPER_MAX_HEADS)
    throw std::invalid_argument("esper_kernels._C: num_heads must be in [1, " + std::to_string(ESPER_MAX_HEADS) +
                                "], got " + std::to_string(H));
  if ((int64_t)ints.size() != INTS_SCALAR + INTS_PER_HEAD * H + INTS_TAIL ||
      (int64_t)floats.size() != FLOATS_SCALAR + 2 * H)
    throw std::invalid_argument("esper_kernels._C: malformed call (" + std::to_string(ints.size()) + " ints, " +
                                std::to_string(floats.size()) + " floats for " + std::to_string(H) + " heads)");
  PPOParams P;
  std::memset(&P, 0, sizeof(P));
  Reader r{ints};
  P.n = r.next();
  P.num_heads = (int32_t)r.next();
  r.next();  // max_size: recomputed below
  P.logits_dtype = (int32_t)r.next();
  P.has_mask = (int32_t)r.next();
  P.has_rel = (int32_t)r.next();
  P.per_head = (int32_t)r.next();
  P.adv_per_head = (int32_t)r.next();
  P.normalize_entropy = (int32_t)r.next();
  P.has_values = (int32_t)r.next();
  P.has_vclip = (int32_t)r.next();
  P.has_jclamp = (int32_t)r.next();
  int max_size = 1;
  for (int h = 0; h < H; ++h) {
    const int64_t A = r.next();
    if (A < 1 || A > (1 << 30)) throw std::invalid_argument("esper_kernels._C: bad head size " + std::to_string(A));
    P.sizes[h] = (int32_t)A;
    max_size = std::max(max_size, (int)A);
    P.logits[h] = (uintptr_t)r.next();
    P.logits_rs[h] = r.next();
    P.masks[h] = (uintptr_t)r.next();
    P.masks_rs[h] = r.next();
    P.grads[h] = (uintptr_t)r.next();
    P.grads_rs[h] = r.next();
    P.actions[h] = r.vec();
    P.old_lp[h] = r.vec();
    P.rel[h] = r.vec();
    P.adv[h] = r.vec();
  }
  P.max_size = max_size;
  P.weights = r.vec();
  P.values = r.vec();
  P.returns = r.vec();
  P.old_values = r.vec();
  P.value_weights = r.vec();
  P.losses = (uintptr_t)r.next();
  P.log_probs = (uintptr_t)r.next();
  P.entropy = (uintptr_t)r.next();
  P.joint_ratio = (uintptr_t)r.next();
  P.stats = (uintptr_t)r.next();
  P.saved = (uintptr_t)r.next();
  P.grad_losses = r.vec();
  P.grad_log_probs = r.mat();
  P.grad_entropy = r.mat();
  P.grad_values = (uintptr_t)r.next();
  size_t f = 0;
  P.eps_low = (float)floats[f++];
  P.eps_high = (float)floats[f++];
  P.log_clamp = (float)floats[f++];
  P.joint_clamp = (float)floats[f++];
  P.entropy_coef = (float)floats[f++];
  P.value_coef = (float)floats[f++];
  P.value_clip = (float)floats[f++];
  P.mask_fill = (float)floats[f++];
  for (int h = 0; h < H; ++h) P.floor[h] = (float)floats[f++];
  for (int h = 0; h < H; ++h) P.kcoef[h] = (float)floats[f++];
  if (P.logits_dtype != DT_F32 && P.logits_dtype != DT_F16 && P.logits_dtype != DT_BF16)
    throw std::invalid_argument("esper_kernels._C: logits must be float32, float16 or bfloat16");
  return P;
}

int checked_threads(int nthreads) { return std::max(1, std::min(nthreads, 1024)); }

// ints = (H, per_head, has_values, has_vclip), floats = (entropy_coef, value_coef, kcoef[H])
MetricsCfg decode_metrics_cfg(const std::vector<int64_t>& ints, const std::vector<double>& floats) {
  if (ints.size() != 4 || ints[0] < 1 || ints[0] > ESPER_MAX_HEADS || floats.size() != 2 + (size_t)ints[0])
    throw std::invalid_argument("esper_kernels._C: bad metrics configuration");
  MetricsCfg c{};
  c.num_heads = (int32_t)ints[0];
  c.per_head = (int32_t)ints[1];
  c.has_values = (int32_t)ints[2];
  c.has_vclip = (int32_t)ints[3];
  c.entropy_coef = (float)floats[0];
  c.value_coef = (float)floats[1];
  for (int h = 0; h < c.num_heads; ++h) c.kcoef[h] = (float)floats[2 + h];
  return c;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "esper_kernels native backends (cpu, and cuda when compiled with nvcc); see csrc/";
  m.attr("MAX_HEADS") = ESPER_MAX_HEADS;
  m.attr("GLOBAL_SIZE") = ESPER_GLOBAL_SIZE;
  m.attr("HEAD_SIZE") = ESPER_HEAD_SIZE;
  m.attr("INTS_SCALAR") = INTS_SCALAR;
  m.attr("INTS_PER_HEAD") = INTS_PER_HEAD;
  m.attr("INTS_TAIL") = INTS_TAIL;
  m.attr("FLOATS_SCALAR") = FLOATS_SCALAR;

  m.def(
      "cpu_forward",
      [](const std::vector<int64_t>& ints, const std::vector<double>& floats, int nthreads, bool vectorise) {
        PPOParams P = decode(ints, floats);
        py::gil_scoped_release nogil;
        cpu_forward(P, checked_threads(nthreads), vectorise);
      },
      py::arg("ints"), py::arg("floats"), py::arg("nthreads"), py::arg("vectorise") = true);
  m.def(
      "cpu_backward",
      [](const std::vector<int64_t>& ints, const std::vector<double>& floats, int nthreads, bool vectorise) {
        PPOParams P = decode(ints, floats);
        py::gil_scoped_release nogil;
        cpu_backward(P, checked_threads(nthreads), vectorise);
      },
      py::arg("ints"), py::arg("floats"), py::arg("nthreads"), py::arg("vectorise") = true);

  m.def(
      "derive_metrics",
      [](int64_t stats, int64_t out, const std::vector<int64_t>& ints, const std::vector<double>& floats) {
        const MetricsCfg c = decode_metrics_cfg(ints, floats);
        derive_metrics(c, reinterpret_cast<const float*>(stats), reinterpret_cast<float*>(out));
      },
      py::arg("stats"), py::arg("out"), py::arg("ints"), py::arg("floats"));

#ifdef ESPER_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def(
      "cuda_derive_metrics",
      [](int64_t stats, int64_t out, const std::vector<int64_t>& ints, const std::vector<double>& floats,
         int64_t stream, int device) {
        const MetricsCfg c = decode_metrics_cfg(ints, floats);
        const std::string err = cuda_derive_metrics(c, (uintptr_t)stats, (uintptr_t)out, (uintptr_t)stream, device);
        if (!err.empty()) throw std::runtime_error("esper_kernels cuda metrics: " + err);
      },
      py::arg("stats"), py::arg("out"), py::arg("ints"), py::arg("floats"), py::arg("stream"), py::arg("device"));
  m.attr("CUDA_STEP_ROWS") = CUDA_STEP_ROWS;
  m.def("cuda_status", []() { return cuda_status(); });
  m.def(
      "cuda_forward",
      [](const std::vector<int64_t>& ints, const std::vector<double>& floats, int64_t aux, int64_t parts,
         int64_t stream, int device) {
        PPOParams P = decode(ints, floats);
        CudaScratch S{(uintptr_t)aux, (uintptr_t)parts};
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = cuda_forward(P, S, (uintptr_t)stream, device);
        }
        if (!err.empty()) throw std::runtime_error("esper_kernels cuda forward: " + err);
      },
      py::arg("ints"), py::arg("floats"), py::arg("aux"), py::arg("parts"), py::arg("stream"), py::arg("device"));
  m.def(
      "cuda_backward",
      [](const std::vector<int64_t>& ints, const std::vector<double>& floats, int64_t stream, int device) {
        PPOParams P = decode(ints, floats);
        std::string err;
        {
          py::gil_scoped_release nogil;
          err = cuda_backward(P, (uintptr_t)stream, device);
        }
        if (!err.empty()) throw std::runtime_error("esper_kernels cuda backward: " + err);
      },
      py::arg("ints"), py::arg("floats"), py::arg("stream"), py::arg("device"));
#else
  m.attr("has_cuda") = false;
  m.attr("CUDA_STEP_ROWS") = 128;
#endif
}
