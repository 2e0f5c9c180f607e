// Bindings of the schedules and second-moment estimators. The Python classes in
// saddlescape/estimators.py convert arguments (dtype, contiguity) and document the API; these
// bindings check shapes again so that the compiled objects cannot be misused directly.
//
// Estimator methods keep the GIL: an estimator is mutable state that is not thread-safe, and
// holding the GIL is what serialises calls on one estimator from several Python threads
// (releasing it let concurrent update_batch and preconditioner calls corrupt the factor cache).

#include "common.hpp"

#include <memory>
#include <string>
#include <vector>

namespace {

// A C-contiguous array of exactly dtype T, or a ValueError naming what arrived.
template <class T>
c_array<T> typed(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<T>>(a))
    throw invalid_argument(std::string(name) + " must have dtype " +
                           py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                           dtype_string(a));
  return ensure_c<T>(a, name);
}

template <class T>
c_array<T> vector_arg(const py::array& a, index_t dim, const char* name) {
  SADDLESCAPE_EXPECTS(a.ndim() == 1 && a.shape(0) == dim, name, " must have shape (", dim,
                      ",), got shape ", shape_string(a));
  return typed<T>(a, name);
}

// Runs write(T* out) into a fresh array in Python's layout of the estimate: (d, d), (d,), or a
// list of blocks. Full and diagonal results are written in place; blocks go through one flat
// buffer.
template <class T, class Write>
py::object in_layout(const ema_estimator<T>& est, Write&& write) {
  const index_t d = est.dim();
  if (est.layout() != structure::block) {
    c_array<T> out = est.layout() == structure::diag ? c_array<T>(d) : c_array<T>({d, d});
    write(out.mutable_data());
    return std::move(out);
  }
  std::vector<T> flat(static_cast<std::size_t>(est.estimate_size()));
  write(flat.data());
  py::list blocks;
  index_t at = 0;
  for (const index_t b : est.block_sizes()) {
    c_array<T> out({b, b});
    std::copy(flat.begin() + at, flat.begin() + at + b * b, out.mutable_data());
    blocks.append(std::move(out));
    at += b * b;
  }
  return std::move(blocks);
}

// The constructor shared by both estimator classes: their arguments are the same.
template <class Estimator>
auto estimator_init() {
  return py::init([](index_t dim, std::shared_ptr<schedule> beta, const std::string& s,
                     std::vector<index_t> blocks, bool bias_correction, std::int64_t refresh) {
    return std::make_unique<Estimator>(dim, std::move(beta), parse_structure(s), std::move(blocks),
                                       bias_correction, refresh);
  });
}

template <class T>
void bind_ema(py::module_& m, const char* name) {
  using est = ema_estimator<T>;
  py::class_<est>(m, name)
      .def(estimator_init<est>(), py::arg("dim"), py::arg("beta"), py::arg("structure"),
           py::arg("block_sizes"), py::arg("bias_correction"), py::arg("refresh_every"))
      .def_property_readonly("dim", &est::dim)
      .def_property_readonly("steps", &est::steps)
      .def_property_readonly("structure",
                             [](const est& e) { return std::string(to_string(e.layout())); })
      .def_property_readonly("block_sizes", &est::block_sizes)
      .def(
          "update",
          [](est& e, const py::array& g) {
            const auto a = vector_arg<T>(g, e.dim(), "g");
            e.update(a.data());
          },
          py::arg("g"))
      .def(
          "update_batch",
          [](est& e, const py::array& gs) {
            SADDLESCAPE_EXPECTS(gs.ndim() == 2 && gs.shape(1) == e.dim(),
                                "gs must have shape (k, ", e.dim(), "), got shape ",
                                shape_string(gs));
            const auto a = typed<T>(gs, "gs");
            e.update_batch(a.data(), a.shape(0));
          },
          py::arg("gs"))
      .def("estimate",
           [](const est& e) { return in_layout(e, [&](T* out) { e.estimate(out); }); })
      .def(
          "preconditioner",
          [](est& e, int p, double eps, const std::string& form) {
            const root_spec spec{p, eps, parse_root_form(form)};
            return in_layout(e, [&](T* out) { e.preconditioner(spec, out); });
          },
          py::arg("p"), py::arg("eps"), py::arg("form"))
      .def(
          "apply",
          [](est& e, const py::array& v, int p, double eps, const std::string& form) {
            const root_spec spec{p, eps, parse_root_form(form)};
            const auto a = vector_arg<T>(v, e.dim(), "v");
            c_array<T> out(e.dim());
            e.apply(spec, a.data(), out.mutable_data());
            return out;
          },
          py::arg("v"), py::arg("p"), py::arg("eps"), py::arg("form"))
      .def(
          "set_fallback",
          [](est& e, std::int64_t max_consecutive_failures, double fallback_eps) {
            e.set_fallback({max_consecutive_failures, fallback_eps});
          },
          py::arg("max_consecutive_failures"), py::arg("fallback_eps"))
      .def("fallback_statistics",
           [](const est& e) {
             const fallback_statistics f = e.fallback_stats();
             py::dict d;
             d["failed_refreshes"] = f.failed_refreshes;
             d["float64_retries"] = f.float64_retries;
             d["eps_retries"] = f.eps_retries;
             d["kept_bases"] = f.kept_bases;
             d["consecutive_failures"] = f.consecutive_failures;
             return d;
           })
      .def("inject_factor_failures", &est::inject_factor_failures, py::arg("block"),
           py::arg("attempts"), py::arg("stages"))
      .def("save",
           [](const est& e) {
             const auto st = e.save();
             c_array<T> data(static_cast<py::ssize_t>(st.data.size()));
             std::copy(st.data.begin(), st.data.end(), data.mutable_data());
             return py::make_tuple(st.steps, st.scale, st.beta_product, data, st.factored_at);
           })
      .def(
          "load",
          [](est& e, std::int64_t steps, double scale, double beta_product,
             const py::array& data, std::int64_t factored_at) {
            SADDLESCAPE_EXPECTS(data.ndim() == 1, "state data must be 1-D, got shape ",
                                shape_string(data));
            const auto a = typed<T>(data, "state data");
            typename est::state st{steps, scale, beta_product,
                                   std::vector<T>(a.data(), a.data() + a.size()), factored_at};
            e.load(st);
          },
          py::arg("steps"), py::arg("scale"), py::arg("beta_product"), py::arg("data"),
          py::arg("factored_at") = -1);
}

template <class T>
void bind_covariance(py::module_& m, const char* name) {
  using est = covariance_estimator<T>;
  py::class_<est>(m, name)
      .def(estimator_init<est>(), py::arg("dim"), py::arg("beta"), py::arg("structure"),
           py::arg("block_sizes"), py::arg("bias_correction"), py::arg("refresh_every"))
      .def_property_readonly("ema", py::overload_cast<>(&est::ema),
                             py::return_value_policy::reference_internal)
      .def(
          "update_pair",
          [](est& e, const py::array& g1, const py::array& g2) {
            const auto a = vector_arg<T>(g1, e.ema().dim(), "g1");
            const auto b = vector_arg<T>(g2, e.ema().dim(), "g2");
            e.update_pair(a.data(), b.data());
          },
          py::arg("g1"), py::arg("g2"));
}

}  // namespace

void bind_estimators(py::module_& m) {
  py::class_<schedule, std::shared_ptr<schedule>>(m, "Schedule")
      .def("__call__", &schedule::operator(), py::arg("t"))
      .def("__repr__", &schedule::describe);
  py::class_<constant_schedule, schedule, std::shared_ptr<constant_schedule>>(m,
                                                                              "ConstantSchedule")
      .def(py::init<double>(), py::arg("value"))
      .def_property_readonly("value", &constant_schedule::value);
  py::class_<inverse_sqrt_schedule, schedule, std::shared_ptr<inverse_sqrt_schedule>>(
      m, "InverseSqrtSchedule")
      .def(py::init<double>(), py::arg("eta0"))
      .def_property_readonly("eta0", &inverse_sqrt_schedule::eta0);
  py::class_<beta_from_lr_schedule, schedule, std::shared_ptr<beta_from_lr_schedule>>(
      m, "BetaFromLrSchedule")
      .def(py::init([](std::shared_ptr<schedule> lr, double C, double floor) {
             return std::make_shared<beta_from_lr_schedule>(std::move(lr), C, floor);
           }),
           py::arg("lr"), py::arg("C"), py::arg("floor"))
      .def_property_readonly("C", &beta_from_lr_schedule::C)
      .def_property_readonly("floor", &beta_from_lr_schedule::floor);
  m.def("beta_from_lr", &beta_from_lr, py::arg("lr"), py::arg("C"), py::arg("floor"));

  bind_ema<double>(m, "EMAEstimator_float64");
  bind_ema<float>(m, "EMAEstimator_float32");
  bind_covariance<double>(m, "CovarianceEstimator_float64");
  bind_covariance<float>(m, "CovarianceEstimator_float32");
}
