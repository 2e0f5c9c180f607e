// Bindings of the multi-tensor diagonal steps (diag_step.hpp): lists of 1-D numpy arrays that
// are views of a model's tensors, updated in place, never copied.

#include "common.hpp"

#include <saddlescape/diag_step.hpp>

#include <string>
#include <vector>

namespace {

// The data pointer of entry k of a list of arrays, which must be 1-D, C-contiguous, of
// dtype T, of n entries (n < 0: any, returned through n) and writable if `out`.
template <class T>
T* view(const py::list& arrays, std::size_t k, const char* name, index_t& n, bool out) {
  if (!py::isinstance<py::array>(arrays[k]))
    throw invalid_argument(detail::concat(name, "[", k, "] must be a numpy array, got ",
                                  py::str(py::type::of(arrays[k])).cast<std::string>()));
  py::array a = py::reinterpret_borrow<py::array>(arrays[k]);
  const char* want = sizeof(T) == 4 ? "float32" : "float64";
  SADDLESCAPE_EXPECTS(py::isinstance<py::array_t<T>>(a), name, "[", k, "] must have dtype ", want,
                      " like xs[0], got ", dtype_string(a));
  SADDLESCAPE_EXPECTS(a.ndim() == 1, name, "[", k, "] must be 1-D, got shape ", shape_string(a));
  SADDLESCAPE_EXPECTS(n < 0 || a.shape(0) == n, name, "[", k, "] has ", a.shape(0),
                      " entries, xs[", k, "] ", n);
  SADDLESCAPE_EXPECTS(a.flags() & py::array::c_style, name, "[", k,
                      "] must be C-contiguous (it is used in place)");
  SADDLESCAPE_EXPECTS(!out || a.writeable(), name, "[", k, "] is read-only");
  n = a.shape(0);
  return static_cast<T*>(const_cast<void*>(a.data()));
}

template <class T>
std::vector<diag_tensor<T>> tensors(const py::list& xs, const py::list& gs, const py::list* ms,
                                    const py::list& vs) {
  const std::size_t count = xs.size();
  SADDLESCAPE_EXPECTS(gs.size() == count && vs.size() == count && (!ms || ms->size() == count),
                      "xs, gs, vs", ms ? ", ms" : "", " must have equal lengths, got ", count,
                      ", ", gs.size(), ", ", vs.size());
  std::vector<diag_tensor<T>> out(count);
  for (std::size_t k = 0; k < count; ++k) {
    index_t n = -1;
    out[k].x = view<T>(xs, k, "xs", n, true);
    out[k].g = view<T>(gs, k, "gs", n, false);
    out[k].v = view<T>(vs, k, "vs", n, true);
    if (ms) out[k].m = view<T>(*ms, k, "ms", n, true);
    out[k].n = n;
  }
  return out;
}

bool first_is_float32(const py::list& xs) {
  return xs.size() > 0 && py::isinstance<py::array_t<float>>(xs[0]);
}

template <class T>
void rmsprop_typed(const py::list& xs, const py::list& gs, const py::list& vs, double lr,
                   double beta, double eps, root_form form, double wd, double c, bool move) {
  const auto ts = tensors<T>(xs, gs, nullptr, vs);
  py::gil_scoped_release release;
  diag_rmsprop_step<T>(ts.data(), ts.size(), lr, beta, eps, form, wd, c, move);
}

template <class T>
void adam_typed(const py::list& xs, const py::list& gs, const py::list& ms, const py::list& vs,
                double lr_m, double beta1, double beta2, double eps, root_form form, double wd,
                double c) {
  const auto ts = tensors<T>(xs, gs, &ms, vs);
  py::gil_scoped_release release;
  diag_adam_step<T>(ts.data(), ts.size(), lr_m, beta1, beta2, eps, form, wd, c);
}

}  // namespace

void bind_diag_step(py::module_& m) {
  m.def(
      "diag_rmsprop_step",
      [](const py::list& xs, const py::list& gs, const py::list& vs, double lr, double beta,
         double eps, const std::string& form, double weight_decay, double c, bool move) {
        const root_form f = parse_root_form(form);
        if (first_is_float32(xs))
          rmsprop_typed<float>(xs, gs, vs, lr, beta, eps, f, weight_decay, c, move);
        else
          rmsprop_typed<double>(xs, gs, vs, lr, beta, eps, f, weight_decay, c, move);
      },
      py::arg("xs"), py::arg("gs"), py::arg("vs"), py::arg("lr"), py::arg("beta"), py::arg("eps"),
      py::arg("form"), py::arg("weight_decay"), py::arg("c"), py::arg("move"),
      "Diagonal RMSProp over lists of 1-D float32 or float64 arrays, in place "
      "(saddlescape/diag_step.hpp).");
  m.def(
      "diag_adam_step",
      [](const py::list& xs, const py::list& gs, const py::list& ms, const py::list& vs,
         double lr_m, double beta1, double beta2, double eps, const std::string& form,
         double weight_decay, double c) {
        const root_form f = parse_root_form(form);
        if (first_is_float32(xs))
          adam_typed<float>(xs, gs, ms, vs, lr_m, beta1, beta2, eps, f, weight_decay, c);
        else
          adam_typed<double>(xs, gs, ms, vs, lr_m, beta1, beta2, eps, f, weight_decay, c);
      },
      py::arg("xs"), py::arg("gs"), py::arg("ms"), py::arg("vs"), py::arg("lr_m"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("form"),
      py::arg("weight_decay"), py::arg("c"),
      "Diagonal Adam over lists of 1-D float32 or float64 arrays, in place "
      "(saddlescape/diag_step.hpp).");
}
