// Bindings of the problems, optimizers and the native loop. The Python classes in
// saddlescape/problems.py, optimizers.py and runner.py document the API and convert arguments;
// these bindings check shapes again so that the compiled objects cannot be misused directly.
//
// Python callables (oracles, preconditioners) are called with the GIL re-acquired, once per
// call; run() and run_many() release it for the rest of the loop.

#include "common.hpp"

#include <memory>
#include <string>
#include <vector>

namespace {

using darray = c_array<double>;

// A float array of shape (dim,) as float64, converted (copied) only if it must be.
darray vector_in(const py::array& a, index_t dim, const char* name) {
  SADDLESCAPE_EXPECTS(a.ndim() == 1 && a.shape(0) == dim, name, " must have shape (", dim,
                      ",), got shape ", shape_string(a));
  expect_float(a, name);
  return ensure_c<double>(a, name);
}

// x is updated in place, so it must be exactly a writable C-contiguous float64 (dim,) array.
double* vector_inout(py::array& x, index_t dim, const char* name) {
  SADDLESCAPE_EXPECTS(is_float64(x), name, " must have dtype float64 to be updated in place, got ",
                      dtype_string(x));
  SADDLESCAPE_EXPECTS(x.ndim() == 1 && x.shape(0) == dim, name, " must have shape (", dim,
                      ",), got shape ", shape_string(x));
  SADDLESCAPE_EXPECTS(x.flags() & py::array::c_style, name,
                      " must be C-contiguous to be updated in place");
  SADDLESCAPE_EXPECTS(x.writeable(), name, " is read-only");
  return static_cast<double*>(x.mutable_data());
}

darray to_numpy(const std::vector<double>& v) {
  darray out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

darray matrix_out(index_t rows, index_t cols) { return darray({rows, cols}); }

// A Python object that may be released from a thread without the GIL (a sampler or callable
// destroyed at the end of a run that released it).
struct gil_object {
  py::object obj;
  explicit gil_object(py::object o) : obj(std::move(o)) {}
  gil_object(const gil_object&) = delete;
  gil_object& operator=(const gil_object&) = delete;
  ~gil_object() {
    py::gil_scoped_acquire gil;
    obj = py::object();
  }
};

// Calls fn(x_copy, *extra) and writes its (dim,) float result to out.
template <class... Extra>
void call_vector(const py::object& fn, const double* x, index_t dim, double* out, const char* what,
                 Extra&&... extra) {
  py::gil_scoped_acquire gil;
  darray xa(dim);
  std::copy(x, x + dim, xa.mutable_data());
  const py::object r = fn(xa, std::forward<Extra>(extra)...);
  py::array a = py::array::ensure(r);
  if (a && a.ndim() == 0 && dim == 1) a = a.reshape({1});
  SADDLESCAPE_EXPECTS(a && a.ndim() == 1 && a.shape(0) == dim, what, " must return an array of shape (",
                      dim, ",), got ",
                      a ? shape_string(a) : std::string(py::str(py::type::handle_of(r))));
  const char kind = a.dtype().kind();
  SADDLESCAPE_EXPECTS(kind == 'f' || kind == 'i' || kind == 'u', what,
                      " must return real numbers, got dtype ", dtype_string(a));
  const darray d = ensure_c<double>(a, what);
  std::copy(d.data(), d.data() + dim, out);
}

// A problem given by Python callables: oracle(x, rng) -> g with rng a numpy Generator
// (PCG64 seeded with the run's seed), and optional value(x) and gradient(x).
class py_problem final : public problem {
 public:
  py_problem(index_t dim, py::object oracle, py::object value, py::object gradient)
      : d_(dim), oracle_(std::make_shared<gil_object>(std::move(oracle))),
        value_(std::make_shared<gil_object>(std::move(value))),
        gradient_(std::make_shared<gil_object>(std::move(gradient))) {
    SADDLESCAPE_EXPECTS(dim >= 1, "dim must be >= 1, got ", dim);
  }
  index_t dim() const noexcept override { return d_; }
  std::string describe() const override { return detail::concat("Oracle(dim=", d_, ")"); }

  void stochastic_gradient(const double* x, rng& r, double* g) const override {
    py::gil_scoped_acquire gil;
    sample_with(generator(r.next()), x, g);
  }
  void sample_with(const py::object& gen, const double* x, double* g) const {
    call_vector(oracle_->obj, x, d_, g, "the oracle", gen);
  }
  static py::object generator(std::uint64_t seed) {
    py::gil_scoped_acquire gil;
    const auto random = py::module_::import("numpy.random");
    return random.attr("Generator")(random.attr("PCG64")(seed));
  }
  std::unique_ptr<sampler> sampler_for(std::uint64_t seed) const override;

  bool has_value() const noexcept override { return !value_->obj.is_none(); }
  double value(const double* x) const override {
    if (!has_value()) return problem::value(x);
    py::gil_scoped_acquire gil;
    darray xa(d_);
    std::copy(x, x + d_, xa.mutable_data());
    const py::object r = value_->obj(xa);
    try {
      return r.cast<double>();
    } catch (const py::cast_error&) {
      throw invalid_argument("value must return a real number, got " +
                             std::string(py::str(py::type::handle_of(r))));
    }
  }
  bool has_gradient() const noexcept override { return !gradient_->obj.is_none(); }
  void gradient(const double* x, double* g) const override {
    if (!has_gradient()) return problem::gradient(x, g);
    call_vector(gradient_->obj, x, d_, g, "gradient");
  }

 private:
  index_t d_;
  std::shared_ptr<gil_object> oracle_, value_, gradient_;
};

class py_sampler final : public sampler {
 public:
  py_sampler(const py_problem& p, std::uint64_t seed)
      : p_(p), gen_(std::make_unique<gil_object>(py_problem::generator(seed))) {}
  void sample(const double* x, double* g) override { p_.sample_with(gen_->obj, x, g); }

 private:
  const py_problem& p_;
  std::unique_ptr<gil_object> gen_;
};

std::unique_ptr<sampler> py_problem::sampler_for(std::uint64_t seed) const {
  return std::make_unique<py_sampler>(*this, seed);
}

// ---------------------------------------------------------------------------------------------
// Problems

darray eval_vector(const problem& p, const py::array& x, void (problem::*fn)(const double*, double*) const) {
  const auto xa = vector_in(x, p.dim(), "x");
  darray out(p.dim());
  (p.*fn)(xa.data(), out.mutable_data());
  return out;
}

darray eval_matrix(const problem& p, const py::array& x,
                   void (problem::*fn)(const double*, double*) const) {
  const auto xa = vector_in(x, p.dim(), "x");
  darray out = matrix_out(p.dim(), p.dim());
  (p.*fn)(xa.data(), out.mutable_data());
  return out;
}

std::vector<double> flat(const py::array& a, const char* name) {
  expect_float(a, name);
  const darray d = ensure_c<double>(a, name);
  return std::vector<double>(d.data(), d.data() + d.size());
}

// A run's gradient source handed to Python, with the dimension its problem checks against.
struct bound_sampler {
  std::unique_ptr<sampler> s;
  index_t dim;
};

void bind_problems(py::module_& m) {
  py::class_<bound_sampler>(m, "Sampler")
      .def_readonly("dim", &bound_sampler::dim)
      .def(
          "sample",
          [](bound_sampler& s, const py::array& x) {
            const auto xa = vector_in(x, s.dim, "x");
            darray out(s.dim);
            s.s->sample(xa.data(), out.mutable_data());
            return out;
          },
          py::arg("x"), "A stochastic gradient at x; successive calls continue the stream.");

  py::class_<problem, std::shared_ptr<problem>>(m, "Problem")
      .def_property_readonly("dim", &problem::dim)
      .def("__repr__", &problem::describe)
      .def_property_readonly("has_value", &problem::has_value)
      .def_property_readonly("has_gradient", &problem::has_gradient)
      .def_property_readonly("has_hessian", &problem::has_hessian)
      .def_property_readonly("has_second_moment", &problem::has_second_moment)
      .def(
          "value",
          [](const problem& p, const py::array& x) {
            const auto xa = vector_in(x, p.dim(), "x");
            return p.value(xa.data());
          },
          py::arg("x"))
      .def("gradient", [](const problem& p, const py::array& x) {
        return eval_vector(p, x, &problem::gradient);
      }, py::arg("x"))
      .def("hessian", [](const problem& p, const py::array& x) {
        return eval_matrix(p, x, &problem::hessian);
      }, py::arg("x"))
      .def("second_moment", [](const problem& p, const py::array& x) {
        return eval_matrix(p, x, &problem::second_moment);
      }, py::arg("x"))
      .def(
          "lambda_min",
          [](const problem& p, const py::array& x) {
            const auto xa = vector_in(x, p.dim(), "x");
            return p.lambda_min(xa.data());
          },
          py::arg("x"))
      .def(
          "project",
          [](const problem& p, const py::array& x) {
            darray out = vector_in(x, p.dim(), "x");
            darray copy(p.dim());
            std::copy(out.data(), out.data() + p.dim(), copy.mutable_data());
            p.project(copy.mutable_data());
            return copy;
          },
          py::arg("x"))
      .def(
          "stochastic_gradients",
          [](const problem& p, const py::array& x, index_t n, std::uint64_t seed) {
            SADDLESCAPE_EXPECTS(n >= 0, "n must be >= 0, got ", n);
            const auto xa = vector_in(x, p.dim(), "x");
            darray out = matrix_out(n, p.dim());
            const auto s = p.sampler_for(seed);
            for (index_t i = 0; i < n; ++i) s->sample(xa.data(), out.mutable_data() + i * p.dim());
            return out;
          },
          py::arg("x"), py::arg("n") = 1, py::arg("seed") = 0,
          "n stochastic gradients at x, shape (n, dim), drawn as a run with this seed draws them.")
      .def(
          "sampler",
          [](const problem& p, std::uint64_t seed) {
            return bound_sampler{p.sampler_for(seed), p.dim()};
          },
          py::arg("seed") = 0, py::keep_alive<0, 1>(),
          "The gradient source of a run with this seed (for SaddleEscape.step).");

  py::class_<saddle_problem, problem, std::shared_ptr<saddle_problem>>(m, "SaddleProblem")
      .def(py::init([](const py::array& h, const py::array& noise_cov, index_t n, int power,
                       std::uint64_t seed) {
             return std::make_shared<saddle_problem>(flat(h, "h"), flat(noise_cov, "noise_cov"),
                                                     n, power, seed);
           }),
           py::arg("h"), py::arg("noise_cov"), py::arg("n"), py::arg("power"), py::arg("seed"))
      .def_static(
          "from_components",
          [](const py::array& h, const py::array& b, int power) {
            SADDLESCAPE_EXPECTS(h.ndim() == 1, "h must have shape (d,), got ", shape_string(h));
            SADDLESCAPE_EXPECTS(b.ndim() == 2 && b.shape(1) == h.shape(0), "b must have shape (n, ",
                                h.shape(0), "), got ", shape_string(b));
            return std::make_shared<saddle_problem>(
                saddle_problem::from_components(flat(h, "h"), flat(b, "b"), power));
          },
          py::arg("h"), py::arg("b"), py::arg("power"))
      .def_property_readonly("h", [](const saddle_problem& p) { return to_numpy(p.h()); })
      .def_property_readonly("b", [](const saddle_problem& p) {
        darray out = matrix_out(p.n(), p.dim());
        std::copy(p.b().begin(), p.b().end(), out.mutable_data());
        return out;
      })
      .def_property_readonly("noise_cov", [](const saddle_problem& p) {
        darray out = matrix_out(p.dim(), p.dim());
        std::copy(p.noise_cov().begin(), p.noise_cov().end(), out.mutable_data());
        return out;
      })
      .def_property_readonly("n", &saddle_problem::n)
      .def_property_readonly("power", &saddle_problem::power);

  py::class_<reddi_counterexample, problem, std::shared_ptr<reddi_counterexample>>(
      m, "ReddiCounterexample")
      .def(py::init<double, double>(), py::arg("C"), py::arg("zeta"))
      .def_property_readonly("C", &reddi_counterexample::C)
      .def_property_readonly("zeta", &reddi_counterexample::zeta)
      .def_property_readonly("p", &reddi_counterexample::p);

  py::class_<noisy_quadratic, problem, std::shared_ptr<noisy_quadratic>>(m, "NoisyQuadratic")
      .def(py::init([](const py::array& H, const py::array& noise_cov) {
             SADDLESCAPE_EXPECTS(H.ndim() == 2 && H.shape(0) == H.shape(1) && H.shape(0) >= 1,
                                 "H must have shape (d, d) with d >= 1, got ", shape_string(H));
             const index_t d = H.shape(0);
             SADDLESCAPE_EXPECTS(
                 (noise_cov.ndim() == 1 && noise_cov.shape(0) == d) ||
                     (noise_cov.ndim() == 2 && noise_cov.shape(0) == d && noise_cov.shape(1) == d),
                 "noise_cov must have shape (", d, ",) or (", d, ", ", d, "), got ",
                 shape_string(noise_cov));
             return std::make_shared<noisy_quadratic>(d, flat(H, "H"), flat(noise_cov, "noise_cov"));
           }),
           py::arg("H"), py::arg("noise_cov"));

  py::class_<logistic_regression, problem, std::shared_ptr<logistic_regression>>(
      m, "LogisticRegression")
      .def(py::init([](const py::array& X, const py::array_t<std::int64_t, py::array::c_style |
                                                                              py::array::forcecast>& y,
                       index_t batch_size, double l2, index_t classes) {
             SADDLESCAPE_EXPECTS(X.ndim() == 2, "X must have shape (n, p), got ", shape_string(X));
             SADDLESCAPE_EXPECTS(y.ndim() == 1, "y must have shape (n,), got ", shape_string(y));
             return std::make_shared<logistic_regression>(
                 flat(X, "X"), X.shape(0), X.shape(1),
                 std::vector<std::int64_t>(y.data(), y.data() + y.size()), batch_size, l2,
                 classes);
           }),
           py::arg("X"), py::arg("y"), py::arg("batch_size"), py::arg("l2"), py::arg("classes"))
      .def_property_readonly("samples", &logistic_regression::samples)
      .def_property_readonly("features", &logistic_regression::features)
      .def_property_readonly("classes", &logistic_regression::classes)
      .def_property_readonly("batch_size", &logistic_regression::batch_size)
      .def_property_readonly("l2", &logistic_regression::l2);

  // C callables, e.g. from ctypes, cffi or numba.cfunc: the loop calls them without the GIL.
  // Each call gets a fresh 64-bit key drawn from the run's generator, so that a callable that
  // seeds its own randomness from the key is reproducible and thread-safe.
  m.def(
      "native_problem",
      [](index_t dim, std::uintptr_t address, py::object owner) -> std::shared_ptr<problem> {
        SADDLESCAPE_EXPECTS(address != 0, "the function address is null");
        using fn = void (*)(std::int64_t, const double*, double*, std::uint64_t);
        const auto f = reinterpret_cast<fn>(address);
        // The Python object that owns the code (a ctypes callback, a numba cfunc) lives as
        // long as the problem: the address alone would dangle once Python collected it.
        auto held = std::make_shared<gil_object>(std::move(owner));
        return std::make_shared<function_problem>(
            dim, [f, dim, held](const double* x, rng& r, double* g) { f(dim, x, g, r.next()); });
      },
      py::arg("dim"), py::arg("address"), py::arg("owner"));

  py::class_<py_problem, problem, std::shared_ptr<py_problem>>(m, "Oracle")
      .def(py::init<index_t, py::object, py::object, py::object>(), py::arg("dim"),
           py::arg("oracle"), py::arg("value"), py::arg("gradient"));
}

// ---------------------------------------------------------------------------------------------
// Optimizers

py::dict state_to_python(const optimizer_state& st) {
  py::dict arrays, scalars;
  for (const auto& [name, v] : st.arrays) arrays[py::str(name)] = to_numpy(v);
  for (const auto& [name, v] : st.scalars) scalars[py::str(name)] = v;
  py::dict out;
  out["kind"] = st.kind;
  out["arrays"] = arrays;
  out["scalars"] = scalars;
  return out;
}

optimizer_state state_from_python(const py::dict& d) {
  SADDLESCAPE_EXPECTS(d.contains("kind") && d.contains("arrays") && d.contains("scalars"),
                      "a state dict has the keys 'kind', 'arrays' and 'scalars'");
  SADDLESCAPE_EXPECTS(py::isinstance<py::str>(d["kind"]), "the state's 'kind' must be a string");
  SADDLESCAPE_EXPECTS(py::isinstance<py::dict>(d["arrays"]) && py::isinstance<py::dict>(d["scalars"]),
                      "the state's 'arrays' and 'scalars' must be dicts");
  optimizer_state st;
  st.kind = d["kind"].cast<std::string>();
  for (const auto& [k, v] : d["arrays"].cast<py::dict>()) {
    SADDLESCAPE_EXPECTS(py::isinstance<py::str>(k), "the state's array names must be strings");
    const auto name = k.cast<std::string>();
    const py::array a = py::array::ensure(v);
    SADDLESCAPE_EXPECTS(a && a.ndim() == 1, "the state's '", name, "' must be a 1-D array");
    st.arrays[name] = flat(a, name.c_str());
  }
  for (const auto& [k, v] : d["scalars"].cast<py::dict>()) {
    SADDLESCAPE_EXPECTS(py::isinstance<py::str>(k), "the state's scalar names must be strings");
    const auto name = k.cast<std::string>();
    // Real numbers only: a bool or a string is a damaged state, not a count.
    const bool real = !py::isinstance<py::bool_>(v) &&
                      (py::isinstance<py::float_>(v) || py::isinstance<py::int_>(v) ||
                       py::hasattr(v, "dtype"));
    SADDLESCAPE_EXPECTS(real, "the state's '", name, "' must be a real number, got ",
                        std::string(py::str(py::type::handle_of(v))));
    try {
      st.scalars[name] = v.cast<double>();
    } catch (const py::cast_error&) {
      throw invalid_argument("the state's '" + name + "' must be a real number");
    }
  }
  return st;
}

rmsprop_options rmsprop_opts(double eps, const std::string& s, const std::string& form,
                             std::int64_t burn_in, std::int64_t refresh_every,
                             std::vector<index_t> blocks, const std::string& solver, double tol,
                             std::int64_t max_consecutive_failures, double fallback_eps) {
  rmsprop_options o;
  o.eps = eps;
  o.layout = parse_structure(s);
  o.form = parse_root_form(form);
  o.burn_in = burn_in;
  o.refresh_every = refresh_every;
  o.block_sizes = std::move(blocks);
  o.solver = parse_root_solver(solver);
  o.tol = tol;
  o.max_consecutive_failures = max_consecutive_failures;
  o.fallback_eps = fallback_eps;
  return o;
}

// Per-block statistics as a dict; the fields a source does not keep (empty) are left out.
py::dict statistics_dict(const block_statistics& s) {
  py::dict d;
  auto put = [&](const char* name, const auto& v) {
    if (!v.empty()) d[name] = v;
  };
  put("refreshes", s.refreshes);
  put("warm_refreshes", s.warm_refreshes);
  put("fallbacks", s.fallbacks);
  put("lambda_min", s.lambda_min);
  put("lambda_max", s.lambda_max);
  put("pending", s.pending);
  put("failed_refreshes", s.failed_refreshes);
  put("float64_retries", s.float64_retries);
  put("eps_retries", s.eps_retries);
  put("kept_bases", s.kept_bases);
  put("consecutive_failures", s.consecutive_failures);
  return d;
}

void bind_optimizers(py::module_& m) {
  py::class_<optimizer, std::shared_ptr<optimizer>>(m, "Optimizer")
      .def_property_readonly("dim", &optimizer::dim)
      .def_property_readonly("steps", &optimizer::steps)
      .def_property_readonly("moves", &optimizer::moves)
      .def_property_readonly("burn_in_remaining", &optimizer::burn_in_remaining)
      .def("lr", &optimizer::lr, py::arg("t"))
      .def("__repr__", &optimizer::describe)
      .def(
          "step",
          [](optimizer& o, py::array& x, const py::array& g, bound_sampler* source) {
            double* xp = vector_inout(x, o.dim(), "x");
            const auto ga = vector_in(g, o.dim(), "g");
            SADDLESCAPE_EXPECTS(!source || source->dim == o.dim(), "the source has dim ",
                                source ? source->dim : 0, " but the optimizer has dim ", o.dim());
            o.step(xp, ga.data(), source ? source->s.get() : nullptr);
          },
          py::arg("x"), py::arg("g"), py::arg("source") = nullptr)
      .def(
          "observe",
          [](optimizer& o, const py::array& g) {
            const auto ga = vector_in(g, o.dim(), "g");
            o.observe(ga.data());
          },
          py::arg("g"))
      .def("state_dict", [](const optimizer& o) { return state_to_python(o.state_dict()); })
      .def(
          "load_state_dict",
          [](optimizer& o, const py::dict& d) { o.load_state_dict(state_from_python(d)); },
          py::arg("state"));

  py::class_<sgd, optimizer, std::shared_ptr<sgd>>(m, "SGD")
      .def(py::init<index_t, schedule_ptr>(), py::arg("dim"), py::arg("lr"));

  py::class_<preconditioned_sgd, optimizer, std::shared_ptr<preconditioned_sgd>>(
      m, "PreconditionedSGD")
      .def(py::init([](index_t dim, schedule_ptr lr, py::object fn) {
             auto held = std::make_shared<gil_object>(std::move(fn));
             auto direction = [held, dim](const double* x, const double* g, double* out) {
               py::gil_scoped_acquire gil;
               darray xa(dim);
               std::copy(x, x + dim, xa.mutable_data());
               const py::object r = held->obj(xa);
               const py::array a = py::array::ensure(r);
               const bool diag = a && a.ndim() == 1 && a.shape(0) == dim;
               const bool full = a && a.ndim() == 2 && a.shape(0) == dim && a.shape(1) == dim;
               SADDLESCAPE_EXPECTS(diag || full, "the preconditioner must return an array of "
                                   "shape (", dim, ",) or (", dim, ", ", dim, "), got ",
                                   a ? shape_string(a)
                                     : std::string(py::str(py::type::handle_of(r))));
               expect_float(a, "the preconditioner's result");
               const darray A = ensure_c<double>(a, "the preconditioner's result");
               const double* p = A.data();
               for (index_t i = 0; i < dim; ++i) {
                 if (diag) {
                   out[i] = p[i] * g[i];
                   continue;
                 }
                 double s = 0.0;
                 for (index_t j = 0; j < dim; ++j) s += p[i * dim + j] * g[j];
                 out[i] = s;
               }
             };
             return std::make_shared<preconditioned_sgd>(dim, std::move(lr), direction,
                                                         "a Python callable");
           }),
           py::arg("dim"), py::arg("lr"), py::arg("preconditioner"))
      .def_static(
          "native",
          [](index_t dim, schedule_ptr lr, std::uintptr_t address, py::object owner) {
            SADDLESCAPE_EXPECTS(address != 0, "the function address is null");
            using fn = void (*)(std::int64_t, const double*, const double*, double*);
            const auto f = reinterpret_cast<fn>(address);
            auto held = std::make_shared<gil_object>(std::move(owner));  // see native_problem
            return std::make_shared<preconditioned_sgd>(
                dim, std::move(lr),
                [f, dim, held](const double* x, const double* g, double* out) {
                  f(dim, x, g, out);
                },
                "a C function");
          },
          py::arg("dim"), py::arg("lr"), py::arg("address"), py::arg("owner"))
      .def_static(
          "idealized",
          [](std::shared_ptr<problem> p, schedule_ptr lr, double eps, const std::string& form) {
            return preconditioned_sgd::idealized(std::move(p), std::move(lr),
                                                 root_spec{2, eps, parse_root_form(form)});
          },
          py::arg("problem"), py::arg("lr"), py::arg("eps"), py::arg("form"));

  py::class_<rmsprop, optimizer, std::shared_ptr<rmsprop>>(m, "RMSProp")
      .def(py::init([](index_t dim, schedule_ptr lr, schedule_ptr beta, double eps,
                       const std::string& s, const std::string& form, std::int64_t burn_in,
                       std::int64_t refresh_every, std::vector<index_t> blocks,
                       const std::string& solver, double tol,
                       std::int64_t max_consecutive_failures, double fallback_eps) {
             return std::make_shared<rmsprop>(
                 dim, std::move(lr), std::move(beta),
                 rmsprop_opts(eps, s, form, burn_in, refresh_every, std::move(blocks), solver, tol,
                              max_consecutive_failures, fallback_eps));
           }),
           py::arg("dim"), py::arg("lr"), py::arg("beta"), py::arg("eps"), py::arg("structure"),
           py::arg("form"), py::arg("burn_in"), py::arg("refresh_every"), py::arg("block_sizes"),
           py::arg("solver"), py::arg("tol"), py::arg("max_consecutive_failures") = 3,
           py::arg("fallback_eps") = 0.0)
      .def("statistics", [](const rmsprop& o) { return statistics_dict(o.statistics()); })
      .def("inject_refresh_failures", &rmsprop::inject_refresh_failures, py::arg("block"),
           py::arg("attempts"), py::arg("stages"))
      .def_property_readonly("updates", &rmsprop::updates)
      .def_property_readonly("structure",
                             [](const rmsprop& o) { return std::string(to_string(o.options().layout)); })
      .def("estimate", [](const rmsprop& o) { return to_numpy(o.estimate()); });

  py::class_<adam, optimizer, std::shared_ptr<adam>>(m, "Adam")
      .def(py::init([](index_t dim, schedule_ptr lr, double beta1, schedule_ptr beta2, double eps,
                       const std::string& s, const std::string& form, std::int64_t refresh_every,
                       std::vector<index_t> blocks, std::int64_t max_consecutive_failures,
                       double fallback_eps) {
             adam_options o;
             o.max_consecutive_failures = max_consecutive_failures;
             o.fallback_eps = fallback_eps;
             o.eps = eps;
             o.layout = parse_structure(s);
             o.form = parse_root_form(form);
             o.refresh_every = refresh_every;
             o.block_sizes = std::move(blocks);
             return std::make_shared<adam>(dim, std::move(lr), beta1, std::move(beta2), o);
           }),
           py::arg("dim"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
           py::arg("structure"), py::arg("form"), py::arg("refresh_every"),
           py::arg("block_sizes"), py::arg("max_consecutive_failures") = 3,
           py::arg("fallback_eps") = 0.0)
      .def("statistics", [](const adam& o) { return statistics_dict(o.statistics()); })
      .def("inject_refresh_failures", &adam::inject_refresh_failures, py::arg("block"),
           py::arg("attempts"), py::arg("stages"));

  py::class_<saddle_escape, optimizer, std::shared_ptr<saddle_escape>>(m, "SaddleEscape")
      .def(py::init<optimizer_ptr, double, std::int64_t, std::int64_t>(), py::arg("base"),
           py::arg("r"), py::arg("t_thresh"), py::arg("hallucinate"))
      .def_property_readonly("base", &saddle_escape::base)
      .def_property_readonly("r", &saddle_escape::r)
      .def_property_readonly("t_thresh", &saddle_escape::t_thresh)
      .def_property_readonly("hallucinate", &saddle_escape::hallucinate);
}

// ---------------------------------------------------------------------------------------------
// The loop

py::dict result_to_python(const problem& p, const run_result& r) {
  py::dict out;
  const auto n = static_cast<py::ssize_t>(r.t.size());
  py::array_t<std::int64_t> t(n);
  std::copy(r.t.begin(), r.t.end(), t.mutable_data());
  out["t"] = t;
  auto optional = [](bool has, const std::vector<double>& v) {
    return has ? py::object(to_numpy(v)) : py::object(py::none());
  };
  out["f"] = optional(p.has_value(), r.f);
  out["grad_norm"] = optional(p.has_gradient(), r.grad_norm);
  out["lambda_min"] = optional(p.has_hessian(), r.lambda_min);
  if (r.x.size() == static_cast<std::size_t>(n * r.dim)) {
    darray x = matrix_out(n, r.dim);
    std::copy(r.x.begin(), r.x.end(), x.mutable_data());
    out["x"] = x;
  } else {
    out["x"] = py::none();
  }
  out["x_final"] = to_numpy(r.x_final);
  out["status"] = std::string(to_string(r.status));
  out["stopped_at"] = r.stopped_at;
  out["message"] = r.message;
  return out;
}

run_options make_options(std::int64_t steps, std::uint64_t seed, std::int64_t record_every,
                         bool record_x) {
  run_options o;
  o.steps = steps;
  o.seed = seed;
  o.record_every = record_every;
  o.record_x = record_x;
  return o;
}

// The exception a run stopped with, as a Python exception object to raise with the records.
py::object exception_object(const std::exception_ptr& error) {
  auto make = [](PyObject* type, const char* what) {
    return py::reinterpret_borrow<py::object>(type)(py::str(what));
  };
  try {
    std::rethrow_exception(error);
  } catch (py::error_already_set& e) {
    return e.value();
  } catch (py::builtin_exception& e) {
    e.set_error();
    return py::error_already_set().value();
  } catch (const invalid_argument& e) {
    return make(PyExc_ValueError, e.what());
  } catch (const numerical_error& e) {
    return py::module_::import("saddlescape._core").attr("NumericalError")(py::str(e.what()));
  } catch (const std::exception& e) {
    return make(PyExc_RuntimeError, e.what());
  } catch (...) {
    return make(PyExc_RuntimeError, "an unknown C++ exception stopped the run");
  }
}

// The loop's monitor from Python: about every 50 ms it takes the GIL, runs pending signal
// handlers (Ctrl-C raises KeyboardInterrupt there) and calls `progress(steps_done)`. Whatever
// they raise stops the run(s) at the next step boundary and is kept here, to be raised with the
// records once the GIL-free loop has returned.
struct py_monitor {
  py::object progress;  // None or a callable
  py::object error;     // None or the exception raised
  bool operator()(std::int64_t done) {
    py::gil_scoped_acquire gil;
    try {
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (!progress.is_none()) progress(done);
    } catch (py::error_already_set& e) {
      error = e.value();
      return false;
    }
    return true;
  }
};

run_options monitored_options(std::int64_t steps, std::uint64_t seed, std::int64_t record_every,
                              bool record_x, py_monitor* monitor, double interval) {
  run_options o = make_options(steps, seed, record_every, record_x);
  o.monitor = [monitor](std::int64_t done) { return (*monitor)(done); };
  o.monitor_interval = interval;
  return o;
}

void bind_runner(py::module_& m) {
  m.def(
      "run",
      [](const problem& p, optimizer& opt, const py::array& x0, std::int64_t steps,
         std::uint64_t seed, std::int64_t record_every, bool record_x, py::object progress,
         double interval) {
        const auto xa = vector_in(x0, p.dim(), "x0");
        py_monitor monitor{std::move(progress), py::none()};
        const run_options o =
            monitored_options(steps, seed, record_every, record_x, &monitor, interval);
        run_result r;
        {
          py::gil_scoped_release release;
          r = run(p, opt, xa.data(), o);
        }
        py::dict out = result_to_python(p, r);
        out["error"] = r.error ? exception_object(r.error) : monitor.error;
        return out;
      },
      py::arg("problem"), py::arg("optimizer"), py::arg("x0"), py::arg("steps"), py::arg("seed"),
      py::arg("record_every"), py::arg("record_x"), py::arg("progress") = py::none(),
      py::arg("monitor_interval") = 0.05);
  m.def(
      "run_many",
      [](const problem& p, const std::vector<std::shared_ptr<optimizer>>& opts,
         const py::array& x0, std::int64_t steps, const std::vector<std::uint64_t>& seeds,
         std::int64_t record_every, bool record_x, int threads, py::object progress,
         double interval) {
        const auto xa = vector_in(x0, p.dim(), "x0");
        std::vector<optimizer*> raw;
        for (const auto& o : opts) raw.push_back(o.get());
        py_monitor monitor{std::move(progress), py::none()};
        const run_options o =
            monitored_options(steps, 0, record_every, record_x, &monitor, interval);
        std::vector<run_result> rs;
        {
          py::gil_scoped_release release;
          rs = run_many(p, raw, xa.data(), o, seeds, threads);
        }
        py::list out;
        for (const auto& r : rs) {
          py::dict d = result_to_python(p, r);
          d["error"] = r.error ? exception_object(r.error) : py::object(py::none());
          out.append(d);
        }
        return py::make_tuple(out, monitor.error);
      },
      py::arg("problem"), py::arg("optimizers"), py::arg("x0"), py::arg("steps"),
      py::arg("seeds"), py::arg("record_every"), py::arg("record_x"), py::arg("threads"),
      py::arg("progress") = py::none(), py::arg("monitor_interval") = 0.05);
}

}  // namespace

void bind_loop(py::module_& m) {
  bind_problems(m);
  bind_optimizers(m);
  bind_runner(m);
}
