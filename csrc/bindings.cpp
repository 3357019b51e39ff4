// esper_kernels._C: the pybind11 module. Plain integers and floats in (data pointers, strides, sizes, dtype
// codes, config), nothing of torch: the extension never includes torch headers nor links libtorch, so a
// PyTorch upgrade cannot break it. A call's parameters cross as one named object, `Params` (the PPOParams
// struct of ppo_params.h, field by field), filled by esper_kernels/backends/native.py; `check` validates it
// before any kernel runs. _C.pyi describes the module.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>

#include "ppo_cpu.h"
#include "ppo_metrics.h"
#include "ppo_onepass_host.h"
#include "ppo_params.h"
#ifdef ESPER_WITH_CUDA
#include "ppo_cuda.h"
#endif

namespace py = pybind11;
using namespace esper;

namespace {

using VecT = std::tuple<uintptr_t, int64_t, int32_t>;           // (pointer, element stride, dtype code)
using MatT = std::tuple<uintptr_t, int64_t, int64_t, int32_t>;  // (pointer, stride 0, stride 1, dtype code)

Vec to_vec(const VecT& t) {
  Vec v{};
  v.ptr = std::get<0>(t);
  v.stride = std::get<1>(t);
  v.dtype = std::get<2>(t);
  return v;
}
VecT from_vec(const Vec& v) { return VecT{v.ptr, v.stride, v.dtype}; }
Mat to_mat(const MatT& t) {
  Mat m{};
  m.ptr = std::get<0>(t);
  m.stride0 = std::get<1>(t);
  m.stride1 = std::get<2>(t);
  m.dtype = std::get<3>(t);
  return m;
}
MatT from_mat(const Mat& m) { return MatT{m.ptr, m.stride0, m.stride1, m.dtype}; }

PPOParams zeroed() {
  PPOParams P;
  std::memset(&P, 0, sizeof(P));
  return P;
}

void check_head(int h) {
  if (h < 0 || h >= ESPER_MAX_HEADS)
    throw std::out_of_range("esper_kernels._C: head index " + std::to_string(h) + " outside [0, " +
                            std::to_string(ESPER_MAX_HEADS) + ")");
}

bool vec_dtype_ok(const Vec& v, bool integral) {
  if (!v.ptr) return true;
  return integral
             ? (v.dtype == DT_I32 || v.dtype == DT_I64)
             : (v.dtype == DT_F32 || v.dtype == DT_F16 || v.dtype == DT_BF16 || v.dtype == DT_F64 || v.dtype == DT_U8);
}

// validate a filled Params before a kernel reads it; sets max_size from the head sizes
void check_params(PPOParams& P) {
  const int H = P.num_heads;
  if (H < 1 || H > ESPER_MAX_HEADS)
    throw std::invalid_argument("esper_kernels._C: num_heads must be in [1, " + std::to_string(ESPER_MAX_HEADS) +
                                "], got " + std::to_string(H));
  if (P.n < 0) throw std::invalid_argument("esper_kernels._C: n must be >= 0, got " + std::to_string(P.n));
  if (P.logits_dtype != DT_F32 && P.logits_dtype != DT_F16 && P.logits_dtype != DT_BF16)
    throw std::invalid_argument("esper_kernels._C: logits must be float32, float16 or bfloat16");
  int max_size = 1;
  for (int h = 0; h < H; ++h) {
    const int A = P.sizes[h];
    if (A < 1 || A > (1 << 30))
      throw std::invalid_argument("esper_kernels._C: head " + std::to_string(h) + " has bad size " + std::to_string(A));
    max_size = std::max(max_size, A);
    if (P.n > 0 && (!P.logits[h] || !P.actions[h].ptr || !P.old_lp[h].ptr || !P.adv[h].ptr))
      throw std::invalid_argument("esper_kernels._C: head " + std::to_string(h) +
                                  ": logits, actions, old log-probs and advantages are required");
    if (P.n > 0 && P.has_mask && !P.masks[h])
      throw std::invalid_argument("esper_kernels._C: head " + std::to_string(h) + ": has_mask but no mask");
    if (P.n > 0 && P.has_rel && !P.rel[h].ptr)
      throw std::invalid_argument("esper_kernels._C: head " + std::to_string(h) + ": has_rel but no relevance");
    if (!vec_dtype_ok(P.actions[h], true) || !vec_dtype_ok(P.old_lp[h], false) || !vec_dtype_ok(P.adv[h], false))
      throw std::invalid_argument("esper_kernels._C: head " + std::to_string(h) + ": bad dtype code");
  }
  if (P.has_values && P.n > 0 && (!P.values.ptr || !P.returns.ptr))
    throw std::invalid_argument("esper_kernels._C: has_values but values or returns missing");
  if (P.has_vclip && P.n > 0 && !P.old_values.ptr)
    throw std::invalid_argument("esper_kernels._C: has_vclip but no old_values");
  P.max_size = max_size;
}

int checked_threads(int nthreads) { return std::max(1, std::min(nthreads, 1024)); }

int64_t dtype_size(int32_t dtype) {
  switch (dtype) {
    case DT_F32:
    case DT_I32:
      return 4;
    case DT_F16:
    case DT_BF16:
      return 2;
    case DT_F64:
    case DT_I64:
      return 8;
    case DT_U8:
      return 1;
  }
  throw std::invalid_argument("esper_kernels._C: unknown dtype code " + std::to_string(dtype));
}

template <class T>
void set_heads(T* dst, const std::vector<T>& src, const char* what) {
  if (src.size() > (size_t)ESPER_MAX_HEADS)
    throw std::invalid_argument(std::string("esper_kernels._C: more than ESPER_MAX_HEADS values for ") + what);
  std::copy(src.begin(), src.end(), dst);
}

// ---- the one-pass CUDA kernels' parameters (shared by the host emulation and the CUDA entry points) ---------
using G4 = std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t>;
struct OnePassArgs {
  bool fixup = false, write_grad = false, force_recompute = false;
  uintptr_t norms = 0, pre_parts = 0, parts = 0, ctl = 0, table = 0, gv = 0;
  G4 gl{0, 0, 0, 0};
};

op::Machine machine_of(int sm_count, int cc_major, int smem_optin, int smem_per_sm, int max_blocks) {
  if (sm_count < 1 || smem_optin < 1 || smem_per_sm < 1)
    throw std::invalid_argument("esper_kernels._C: machine: sm_count and shared-memory sizes must be >= 1");
  op::Machine M{sm_count, cc_major, smem_optin, smem_per_sm, max_blocks};
  return M;
}

// the plan and the scratch of one launch (validated: pointers the kernels write must be there)
op::OnePass make_onepass(const PPOParams& P, const op::Machine& M, const OnePassArgs& a, const MetricsCfg* mc) {
  op::OnePass O;
  std::memset(&O, 0, sizeof(O));
  O.fixup = a.fixup;
  O.write_grad = a.write_grad;
  O.force_recompute = a.force_recompute;
  if (a.write_grad && P.n > 0)
    for (int h = 0; h < P.num_heads; ++h)
      if (!P.grads[h])
        throw std::invalid_argument("esper_kernels._C: write_grad without a gradient pointer for head " +
                                    std::to_string(h));
  const char* err = op::plan(P, M, O);
  if (*err) throw std::invalid_argument(std::string("esper_kernels._C: one-pass plan: ") + err);
  O.norms = a.norms;
  O.pre_parts = a.pre_parts;
  O.parts = a.parts;
  O.ctl = a.ctl;
  O.table = a.table;
  O.gv = a.gv;
  O.write_gv = a.gv != 0;
  O.gl[0] = std::get<0>(a.gl);
  O.gl[1] = std::get<1>(a.gl);
  O.gl[2] = std::get<2>(a.gl);
  O.gl[3] = std::get<3>(a.gl);
  if (!O.norms || !O.ctl) throw std::invalid_argument("esper_kernels._C: one-pass: norms and ctl are required");
  if (!a.fixup) {
    if (!O.pre_parts || !O.parts || !P.losses || !P.stats ||
        (P.n > 0 && (!P.log_probs || !P.entropy || !P.joint_ratio)))
      throw std::invalid_argument("esper_kernels._C: one-pass forward: an output or scratch pointer is missing");
    if (O.table) {
      if (!mc || mc->num_heads != P.num_heads)
        throw std::invalid_argument(
            "esper_kernels._C: one-pass forward: the metric table needs a MetricsCfg of H heads");
      O.mc = *mc;
    }
  }
  return O;
}

py::dict plan_dict(const PPOParams& P, const op::OnePass& O) {
  py::dict d;
  d["path"] = O.path == op::PATH_SMALL ? "small" : (O.path == op::PATH_WIDE ? "wide" : "stream");
  d["grid_pre"] = O.grid_pre;
  d["grid_main"] = O.grid_main;
  d["nparts"] = O.nparts;
  d["rows"] = O.rows;
  d["cluster"] = O.cluster;
  d["chunk"] = O.chunk;
  d["smem"] = O.smem;
  d["segments"] = py::make_tuple(O.nseg_z, O.nseg_m, O.nseg_g);
  d["norms_size"] = op::norms_size(P.num_heads);
  d["pre_size"] = op::pre_size(P.num_heads);
  d["stats_size"] = op::stats_k(P.num_heads);
  d["metrics_size"] = metrics_size(P.num_heads);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "esper_kernels native backends (cpu, and cuda when compiled with nvcc); see csrc/ and _C.pyi";
  m.attr("MAX_HEADS") = ESPER_MAX_HEADS;
  m.attr("GLOBAL_SIZE") = ESPER_GLOBAL_SIZE;
  m.attr("HEAD_SIZE") = ESPER_HEAD_SIZE;
  m.attr("LAYOUT_FINGERPRINT") = ESPER_LAYOUT_FINGERPRINT;

  // ---- the parameters of one call, by name (PPOParams; ppo_params.h has a comment per field)
  py::class_<PPOParams> params(m, "Params");
  params.def(py::init(&zeroed))
      .def("copy", [](const PPOParams& p) { return p; })
      .def_readwrite("n", &PPOParams::n)
      .def_readwrite("num_heads", &PPOParams::num_heads)
      .def_readonly("max_size", &PPOParams::max_size)
      .def_readwrite("logits_dtype", &PPOParams::logits_dtype)
      .def_readwrite("has_mask", &PPOParams::has_mask)
      .def_readwrite("has_rel", &PPOParams::has_rel)
      .def_readwrite("per_head", &PPOParams::per_head)
      .def_readwrite("adv_per_head", &PPOParams::adv_per_head)
      .def_readwrite("normalize_entropy", &PPOParams::normalize_entropy)
      .def_readwrite("has_values", &PPOParams::has_values)
      .def_readwrite("has_vclip", &PPOParams::has_vclip)
      .def_readwrite("has_jclamp", &PPOParams::has_jclamp)
      .def_readwrite("mask_exclude", &PPOParams::mask_exclude)
      .def_readwrite("normalize_adv", &PPOParams::normalize_adv)
      .def_readwrite("adv_std_unbiased", &PPOParams::adv_std_unbiased)
      .def_readwrite("adv_eps_add", &PPOParams::adv_eps_add)
      .def_readwrite("eps_low", &PPOParams::eps_low)
      .def_readwrite("eps_high", &PPOParams::eps_high)
      .def_readwrite("log_clamp", &PPOParams::log_clamp)
      .def_readwrite("joint_clamp", &PPOParams::joint_clamp)
      .def_readwrite("entropy_coef", &PPOParams::entropy_coef)
      .def_readwrite("value_coef", &PPOParams::value_coef)
      .def_readwrite("value_clip", &PPOParams::value_clip)
      .def_readwrite("mask_fill", &PPOParams::mask_fill)
      .def_readwrite("adv_eps", &PPOParams::adv_eps)
      // per head: whole lists in head order (at most MAX_HEADS)
      .def_property(
          "sizes", [](const PPOParams& p) { return std::vector<int32_t>(p.sizes, p.sizes + p.num_heads); },
          [](PPOParams& p, const std::vector<int32_t>& v) { set_heads(p.sizes, v, "sizes"); })
      .def_property(
          "floor", [](const PPOParams& p) { return std::vector<float>(p.floor, p.floor + p.num_heads); },
          [](PPOParams& p, const std::vector<float>& v) { set_heads(p.floor, v, "floor"); })
      .def_property(
          "kcoef", [](const PPOParams& p) { return std::vector<float>(p.kcoef, p.kcoef + p.num_heads); },
          [](PPOParams& p, const std::vector<float>& v) { set_heads(p.kcoef, v, "kcoef"); })
      // one head's tensors: pointers with their row strides, per-step vectors as (pointer, stride, dtype)
      .def(
          "set_head",
          [](PPOParams& p, int h, uintptr_t logits, int64_t logits_rs, uintptr_t masks, int64_t masks_rs,
             const VecT& actions, const VecT& old_lp, const VecT& rel, const VecT& adv) {
            check_head(h);
            p.logits[h] = logits;
            p.logits_rs[h] = logits_rs;
            p.masks[h] = masks;
            p.masks_rs[h] = masks_rs;
            p.actions[h] = to_vec(actions);
            p.old_lp[h] = to_vec(old_lp);
            p.rel[h] = to_vec(rel);
            p.adv[h] = to_vec(adv);
          },
          py::arg("h"), py::kw_only(), py::arg("logits"), py::arg("logits_rs"), py::arg("masks"), py::arg("masks_rs"),
          py::arg("actions"), py::arg("old_lp"), py::arg("rel"), py::arg("adv"))
      // a per-(step, head) input given as one [N, H] matrix (actions, old_lp, rel, adv): head h's column at
      // ptr + h * col_stride elements, each row stride apart (col_stride 0: one vector shared by every head)
      .def(
          "set_columns",
          [](PPOParams& p, const std::string& field, uintptr_t ptr, int64_t row_stride, int64_t col_stride,
             int32_t dtype) {
            Vec* dst = field == "actions"  ? p.actions
                       : field == "old_lp" ? p.old_lp
                       : field == "rel"    ? p.rel
                       : field == "adv"    ? p.adv
                                           : nullptr;
            if (!dst) throw std::invalid_argument("esper_kernels._C: set_columns: unknown field '" + field + "'");
            if (p.num_heads < 0 || p.num_heads > ESPER_MAX_HEADS)
              throw std::invalid_argument("esper_kernels._C: set_columns: set num_heads first");
            const int64_t es = dtype_size(dtype);
            for (int h = 0; h < p.num_heads; ++h)
              dst[h] = Vec{ptr + (uintptr_t)(h * col_stride * es), row_stride, dtype};
          },
          py::arg("field"), py::arg("ptr"), py::arg("row_stride"), py::arg("col_stride"), py::arg("dtype"))
      // packed [N, S] logits, masks or gradients: head h at ptr + offset_h * elem_size, offset_h the sum of the
      // sizes before it (set sizes first), one row stride
      .def(
          "set_packed",
          [](PPOParams& p, const std::string& field, uintptr_t ptr, int64_t row_stride, int64_t elem_size) {
            uintptr_t* dst = field == "logits"  ? p.logits
                             : field == "masks" ? p.masks
                             : field == "grads" ? p.grads
                                                : nullptr;
            int64_t* rs = field == "logits" ? p.logits_rs : field == "masks" ? p.masks_rs : p.grads_rs;
            if (!dst) throw std::invalid_argument("esper_kernels._C: set_packed: unknown field '" + field + "'");
            if (p.num_heads < 0 || p.num_heads > ESPER_MAX_HEADS)
              throw std::invalid_argument("esper_kernels._C: set_packed: set num_heads first");
            int64_t off = 0;
            for (int h = 0; h < p.num_heads; ++h) {
              dst[h] = ptr + (uintptr_t)(off * elem_size);
              rs[h] = row_stride;
              off += p.sizes[h];
            }
          },
          py::arg("field"), py::arg("ptr"), py::arg("row_stride"), py::arg("elem_size"))
      .def(
          "set_grad",
          [](PPOParams& p, int h, uintptr_t ptr, int64_t rs) {
            check_head(h);
            p.grads[h] = ptr;
            p.grads_rs[h] = rs;
          },
          py::arg("h"), py::arg("ptr"), py::arg("rs"))
      .def("head", [](const PPOParams& p, int h) {
        check_head(h);
        py::dict d;
        d["size"] = p.sizes[h];
        d["logits"] = p.logits[h];
        d["logits_rs"] = p.logits_rs[h];
        d["masks"] = p.masks[h];
        d["masks_rs"] = p.masks_rs[h];
        d["grads"] = p.grads[h];
        d["grads_rs"] = p.grads_rs[h];
        d["actions"] = from_vec(p.actions[h]);
        d["old_lp"] = from_vec(p.old_lp[h]);
        d["rel"] = from_vec(p.rel[h]);
        d["adv"] = from_vec(p.adv[h]);
        return d;
      });
#define ESPER_VEC_FIELD(NAME)                                     \
  params.def_property(                                            \
      #NAME, [](const PPOParams& p) { return from_vec(p.NAME); }, \
      [](PPOParams& p, const VecT& v) { p.NAME = to_vec(v); })
  ESPER_VEC_FIELD(weights);
  ESPER_VEC_FIELD(values);
  ESPER_VEC_FIELD(returns);
  ESPER_VEC_FIELD(old_values);
  ESPER_VEC_FIELD(value_weights);
  ESPER_VEC_FIELD(grad_losses);
#undef ESPER_VEC_FIELD
#define ESPER_MAT_FIELD(NAME)                                     \
  params.def_property(                                            \
      #NAME, [](const PPOParams& p) { return from_mat(p.NAME); }, \
      [](PPOParams& p, const MatT& v) { p.NAME = to_mat(v); })
  ESPER_MAT_FIELD(grad_log_probs);
  ESPER_MAT_FIELD(grad_entropy);
#undef ESPER_MAT_FIELD
  params.def_readwrite("losses", &PPOParams::losses)
      .def_readwrite("log_probs", &PPOParams::log_probs)
      .def_readwrite("entropy", &PPOParams::entropy)
      .def_readwrite("joint_ratio", &PPOParams::joint_ratio)
      .def_readwrite("stats", &PPOParams::stats)
      .def_readwrite("saved", &PPOParams::saved)
      .def_readwrite("adv_norm", &PPOParams::adv_norm)
      .def_readwrite("grad_values", &PPOParams::grad_values);
  m.def(
      "check", [](PPOParams& p) { check_params(p); }, py::arg("params"),
      "Validate a filled Params (raises ValueError naming the field); every kernel entry point runs it");

  // ---- what the metric table needs besides the statistics
  py::class_<MetricsCfg>(m, "MetricsCfg")
      .def(py::init([]() {
        MetricsCfg c;
        std::memset(&c, 0, sizeof(c));
        return c;
      }))
      .def_readwrite("num_heads", &MetricsCfg::num_heads)
      .def_readwrite("per_head", &MetricsCfg::per_head)
      .def_readwrite("has_values", &MetricsCfg::has_values)
      .def_readwrite("has_vclip", &MetricsCfg::has_vclip)
      .def_readwrite("ratio_std_unbiased", &MetricsCfg::ratio_std_unbiased)
      .def_readwrite("entropy_coef", &MetricsCfg::entropy_coef)
      .def_readwrite("value_coef", &MetricsCfg::value_coef)
      .def_property(
          "kcoef", [](const MetricsCfg& c) { return std::vector<float>(c.kcoef, c.kcoef + c.num_heads); },
          [](MetricsCfg& c, const std::vector<float>& v) { set_heads(c.kcoef, v, "kcoef"); });

  m.def(
      "cpu_forward",
      [](PPOParams P, int nthreads, bool vectorise) {
        check_params(P);
        py::gil_scoped_release nogil;
        cpu_forward(P, checked_threads(nthreads), vectorise);
      },
      py::arg("params"), py::arg("nthreads"), py::arg("vectorise") = true);
  m.def(
      "cpu_backward",
      [](PPOParams P, int nthreads, bool vectorise) {
        check_params(P);
        py::gil_scoped_release nogil;
        cpu_backward(P, checked_threads(nthreads), vectorise);
      },
      py::arg("params"), py::arg("nthreads"), py::arg("vectorise") = true);
  m.def(
      "derive_metrics",
      [](const MetricsCfg& c, uintptr_t stats, uintptr_t out) {
        if (c.num_heads < 1 || c.num_heads > ESPER_MAX_HEADS)
          throw std::invalid_argument("esper_kernels._C: MetricsCfg.num_heads out of range");
        derive_metrics(c, reinterpret_cast<const float*>(stats), reinterpret_cast<float*>(out));
      },
      py::arg("cfg"), py::arg("stats"), py::arg("out"));

  // ---- the one-pass CUDA kernels run on the CPU (csrc/ppo_onepass_host.h): the kernels' per-row, per-block
  // and last-block code, block by block in order, single-threaded (tests/test_cuda_onepass_host.py)
  auto host_machine = [](int sm_count, int cc_major, int smem_optin, int smem_per_sm, int max_blocks) {
    return machine_of(sm_count, cc_major, smem_optin, smem_per_sm, max_blocks);
  };
  m.def(
      "onepass_plan",
      [host_machine](PPOParams P, bool fixup, bool write_grad, int sm_count, int cc_major, int smem_optin,
                     int smem_per_sm, int max_blocks) {
        check_params(P);
        op::OnePass O;
        std::memset(&O, 0, sizeof(O));
        O.fixup = fixup;
        O.write_grad = write_grad;
        const char* err = op::plan(P, host_machine(sm_count, cc_major, smem_optin, smem_per_sm, max_blocks), O);
        if (*err) throw std::invalid_argument(std::string("esper_kernels._C: one-pass plan: ") + err);
        return plan_dict(P, O);
      },
      py::arg("params"), py::kw_only(), py::arg("fixup"), py::arg("write_grad"), py::arg("sm_count") = 132,
      py::arg("cc_major") = 9, py::arg("smem_optin") = 227 * 1024, py::arg("smem_per_sm") = 228 * 1024,
      py::arg("max_blocks") = 0,
      "The shapes of a one-pass launch (path, grids, partial counts, shared memory) on a given machine");
  m.def(
      "onepass_host_forward",
      [host_machine](PPOParams P, const MetricsCfg& mc, bool write_grad, uintptr_t norms, uintptr_t pre_parts,
                     uintptr_t parts, uintptr_t ctl, uintptr_t table, uintptr_t gv, int sm_count, int cc_major,
                     int smem_optin, int smem_per_sm, int max_blocks) {
        check_params(P);
        OnePassArgs a;
        a.write_grad = write_grad;
        a.norms = norms;
        a.pre_parts = pre_parts;
        a.parts = parts;
        a.ctl = ctl;
        a.table = table;
        a.gv = gv;
        const op::OnePass O =
            make_onepass(P, host_machine(sm_count, cc_major, smem_optin, smem_per_sm, max_blocks), a, &mc);
        py::gil_scoped_release nogil;
        op::host::run(P, O);
      },
      py::arg("params"), py::arg("mcfg"), py::kw_only(), py::arg("write_grad"), py::arg("norms"), py::arg("pre_parts"),
      py::arg("parts"), py::arg("ctl"), py::arg("table"), py::arg("gv"), py::arg("sm_count") = 132,
      py::arg("cc_major") = 9, py::arg("smem_optin") = 227 * 1024, py::arg("smem_per_sm") = 228 * 1024,
      py::arg("max_blocks") = 0);
  m.def(
      "onepass_host_backward",
      [host_machine](PPOParams P, bool write_grad, bool force_recompute, uintptr_t norms, uintptr_t ctl, uintptr_t gv,
                     const G4& grad_losses, int sm_count, int cc_major, int smem_optin, int smem_per_sm,
                     int max_blocks) {
        check_params(P);
        OnePassArgs a;
        a.fixup = true;
        a.write_grad = write_grad;
        a.force_recompute = force_recompute;
        a.norms = norms;
        a.ctl = ctl;
        a.gv = gv;
        a.gl = grad_losses;
        const op::OnePass O =
            make_onepass(P, host_machine(sm_count, cc_major, smem_optin, smem_per_sm, max_blocks), a, nullptr);
        py::gil_scoped_release nogil;
        op::host::run(P, O);
      },
      py::arg("params"), py::kw_only(), py::arg("write_grad"), py::arg("force_recompute"), py::arg("norms"),
      py::arg("ctl"), py::arg("gv"), py::arg("grad_losses"), py::arg("sm_count") = 132, py::arg("cc_major") = 9,
      py::arg("smem_optin") = 227 * 1024, py::arg("smem_per_sm") = 228 * 1024, py::arg("max_blocks") = 0);

#ifdef ESPER_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def(
      "cuda_derive_metrics",
      [](const MetricsCfg& c, uintptr_t stats, uintptr_t out, uintptr_t stream, int device) {
        if (c.num_heads < 1 || c.num_heads > ESPER_MAX_HEADS)
          throw std::invalid_argument("esper_kernels._C: MetricsCfg.num_heads out of range");
        const std::string err = cuda_derive_metrics(c, stats, out, stream, device);
        if (!err.empty()) throw std::runtime_error("esper_kernels cuda metrics: " + err);
      },
      py::arg("cfg"), py::arg("stats"), py::arg("out"), py::arg("stream"), py::arg("device"));
  m.def("cuda_status", []() { return cuda_status(); });
  auto dev_machine = [](int device, int max_blocks) {
    op::Machine M;
    const std::string err = cuda_machine(device, M);
    if (!err.empty()) throw std::runtime_error("esper_kernels cuda: " + err);
    M.max_blocks = max_blocks;
    return M;
  };
  m.def(
      "cuda_onepass_plan",
      [dev_machine](PPOParams P, int device, bool fixup, bool write_grad, int max_blocks) {
        check_params(P);
        op::OnePass O;
        std::memset(&O, 0, sizeof(O));
        O.fixup = fixup;
        O.write_grad = write_grad;
        const char* err = op::plan(P, dev_machine(device, max_blocks), O);
        if (*err) throw std::invalid_argument(std::string("esper_kernels._C: one-pass plan: ") + err);
        if (std::string e = cuda_onepass_occupancy(P, O, device); !e.empty())
          throw std::runtime_error("esper_kernels cuda plan: " + e);
        return plan_dict(P, O);
      },
      py::arg("params"), py::arg("device"), py::kw_only(), py::arg("fixup"), py::arg("write_grad"),
      py::arg("max_blocks") = 0);
  m.def(
      "cuda_onepass_forward",
      [dev_machine](PPOParams P, const MetricsCfg& mc, bool write_grad, uintptr_t norms, uintptr_t pre_parts,
                    uintptr_t parts, uintptr_t ctl, uintptr_t table, uintptr_t gv, uintptr_t stream, int device,
                    int max_blocks) {
        check_params(P);
        OnePassArgs a;
        a.write_grad = write_grad;
        a.norms = norms;
        a.pre_parts = pre_parts;
        a.parts = parts;
        a.ctl = ctl;
        a.table = table;
        a.gv = gv;
        op::OnePass O = make_onepass(P, dev_machine(device, max_blocks), a, &mc);
        std::string err = cuda_onepass_occupancy(P, O, device);  // (the same grid as cuda_onepass_plan's)
        if (err.empty()) {
          py::gil_scoped_release nogil;
          err = cuda_onepass_forward(P, O, stream, device);
        }
        if (!err.empty()) throw std::runtime_error("esper_kernels cuda forward: " + err);
      },
      py::arg("params"), py::arg("mcfg"), py::kw_only(), py::arg("write_grad"), py::arg("norms"), py::arg("pre_parts"),
      py::arg("parts"), py::arg("ctl"), py::arg("table"), py::arg("gv"), py::arg("stream"), py::arg("device"),
      py::arg("max_blocks") = 0);
  m.def(
      "cuda_onepass_backward",
      [dev_machine](PPOParams P, bool write_grad, bool force_recompute, uintptr_t norms, uintptr_t ctl, uintptr_t gv,
                    const G4& grad_losses, uintptr_t stream, int device, int max_blocks) {
        check_params(P);
        OnePassArgs a;
        a.fixup = true;
        a.write_grad = write_grad;
        a.force_recompute = force_recompute;
        a.norms = norms;
        a.ctl = ctl;
        a.gv = gv;
        a.gl = grad_losses;
        op::OnePass O = make_onepass(P, dev_machine(device, max_blocks), a, nullptr);
        std::string err = cuda_onepass_occupancy(P, O, device);
        if (err.empty()) {
          py::gil_scoped_release nogil;
          err = cuda_onepass_backward(P, O, stream, device);
        }
        if (!err.empty()) throw std::runtime_error("esper_kernels cuda backward: " + err);
      },
      py::arg("params"), py::kw_only(), py::arg("write_grad"), py::arg("force_recompute"), py::arg("norms"),
      py::arg("ctl"), py::arg("gv"), py::arg("grad_losses"), py::arg("stream"), py::arg("device"),
      py::arg("max_blocks") = 0);
#else
  m.attr("has_cuda") = false;
#endif
}
