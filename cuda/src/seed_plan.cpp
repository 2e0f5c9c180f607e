#include "seed_plan.hpp"

#include <saddlescape/schedules.hpp>

#include <cmath>
#include <memory>
#include <type_traits>

namespace saddlescape::cuda::detail {

namespace {

using saddlescape::detail::concat;

schedule_params schedule_of(const schedule_ptr& s, const char* what) {
  schedule_params out;
  if (auto c = std::dynamic_pointer_cast<const constant_schedule>(s)) {
    out.a = c->value();
    return out;
  }
  if (auto q = std::dynamic_pointer_cast<const inverse_sqrt_schedule>(s)) {
    out.kind = schedule_kind::inverse_sqrt;
    out.a = q->eta0();
    return out;
  }
  if (auto bl = std::dynamic_pointer_cast<const beta_from_lr_schedule>(s)) {
    if (std::dynamic_pointer_cast<const constant_schedule>(bl->lr())) {
      out.a = (*bl)(0);  // a constant step size makes a constant beta: the CPU's own value
      return out;
    }
    if (auto q = std::dynamic_pointer_cast<const inverse_sqrt_schedule>(bl->lr())) {
      out.kind = schedule_kind::beta_of_inverse_sqrt;
      out.a = q->eta0();
      out.C = bl->C();
      out.floor = bl->floor();
      return out;
    }
  }
  throw invalid_argument(concat("the GPU runner supports constant, inverse_sqrt and beta_from_lr "
                                "schedules for ", what, ", got ", s->describe()));
}

void plan_method(const optimizer& opt, method_params& m) {
  SADDLESCAPE_EXPECTS(opt.steps() == 0, "the GPU runner starts every seed from a fresh optimizer; ",
                      opt.describe(), " has taken ", opt.steps(), " steps");
  const optimizer* base = &opt;
  if (auto se = dynamic_cast<const saddle_escape*>(&opt)) {
    SADDLESCAPE_EXPECTS(se->hallucinate() == 0, "the GPU runner supports SaddleEscape with "
                        "hallucinate = 0, got ", se->hallucinate());
    m.r = se->r();
    m.t_thresh = se->t_thresh();
    base = se->base().get();
    SADDLESCAPE_EXPECTS(base->steps() == 0, "the GPU runner starts every seed from a fresh "
                        "optimizer; the base ", base->describe(), " has taken ", base->steps(),
                        " steps");
  }
  if (auto s = dynamic_cast<const sgd*>(base)) {
    m.kind = method_kind::sgd;
    m.lr = schedule_of(s->lr_schedule(), "lr");
    return;
  }
  if (auto r = dynamic_cast<const rmsprop*>(base)) {
    const rmsprop_options& o = r->options();
    SADDLESCAPE_EXPECTS(o.layout == structure::diag, "the GPU runner supports RMSProp with "
                        "structure diag, got ", to_string(o.layout));
    m.kind = method_kind::rmsprop;
    m.lr = schedule_of(r->lr_schedule(), "lr");
    m.beta = schedule_of(r->beta_schedule(), "beta");
    m.inner = o.form == root_form::adam ? 0.0 : o.eps;
    m.outer = o.form == root_form::adam ? o.eps : 0.0;
    m.burn_in = o.burn_in;
    return;
  }
  throw invalid_argument(concat("the GPU runner supports SGD, RMSProp (structure diag) and "
                                "SaddleEscape over them, got ", opt.describe()));
}

void plan_problem(const problem& p, seed_plan& plan) {
  problem_params& q = plan.problem;
  q.d = static_cast<int>(p.dim());
  if (auto s = dynamic_cast<const saddle_problem*>(&p)) {
    q.kind = problem_kind::saddle;
    plan.h = s->h();
    plan.b = s->b();
    plan.mean = s->mean();
    q.n = static_cast<std::uint64_t>(s->n());
    q.power = s->power();
  } else if (auto c = dynamic_cast<const reddi_counterexample*>(&p)) {
    q.kind = problem_kind::counterexample;
    q.C = c->C();
    q.zeta = c->zeta();
    q.p = c->p();
  } else if (auto n = dynamic_cast<const noisy_quadratic*>(&p)) {
    q.kind = problem_kind::quadratic;
    plan.H = n->H();
    plan.factor = n->noise_factor();
    q.diagonal = n->diagonal_noise();
  } else {
    throw invalid_argument(concat("the GPU runner supports SaddleProblem, ReddiCounterexample and "
                                  "NoisyQuadratic, got ", p.describe()));
  }
  q.h = plan.h.data();
  q.b = plan.b.data();
  q.mean = plan.mean.data();
  q.H = plan.H.data();
  q.factor = plan.factor.data();
}

}  // namespace

void make_seed_plan(const problem& p, const optimizer& opt, const double* x0,
                    const seed_run_options& options, seed_plan& plan) {
  SADDLESCAPE_EXPECTS(p.dim() <= max_seed_dim, "the GPU runner handles dim <= ", max_seed_dim,
                      ", got ", p.describe());
  SADDLESCAPE_EXPECTS(opt.dim() == p.dim(), "the optimizer works in dimension ", opt.dim(),
                      " but the problem in ", p.dim());
  SADDLESCAPE_EXPECTS(options.steps >= 0, "steps must be >= 0, got ", options.steps);
  SADDLESCAPE_EXPECTS(std::isfinite(options.escape_radius) && options.escape_radius >= 0.0,
                      "escape_radius must be finite and >= 0, got ", options.escape_radius);
  SADDLESCAPE_EXPECTS(!std::isinf(options.escape_value), "escape_value must be finite or NaN "
                      "(not used), got ", options.escape_value);
  SADDLESCAPE_EXPECTS(x0 != nullptr, "x0 is null");
  plan.x0.assign(x0, x0 + p.dim());
  for (std::size_t j = 0; j < plan.x0.size(); ++j)
    SADDLESCAPE_EXPECTS(std::isfinite(plan.x0[j]), "x0 must be finite, got ", plan.x0[j],
                        " at index ", j);
  plan_problem(p, plan);
  plan_method(opt, plan.method);
  plan.run.steps = options.steps;
  plan.run.escape_radius = options.escape_radius;
  plan.run.use_escape_value = !std::isnan(options.escape_value);
  plan.run.escape_value = plan.run.use_escape_value ? options.escape_value : 0.0;
}

void size_result(seed_run_result& result, std::int64_t dim, const std::vector<std::uint64_t>& seeds) {
  const std::size_t n = seeds.size();
  result.dim = dim;
  result.seeds = seeds;
  result.escape_step.assign(n, -1);
  result.f_final.assign(n, 0.0);
  result.x_final.assign(n * static_cast<std::size_t>(dim), 0.0);
  result.status.assign(n, run_status::completed);
  result.stopped_at.assign(n, -1);
}

void store_outcome(seed_run_result& result, std::size_t i, const seed_outcome& o) {
  result.escape_step[i] = o.escape_step;
  result.f_final[i] = o.f;
  result.status[i] = static_cast<run_status>(o.status);
  result.stopped_at[i] = o.stopped_at;
}

seed_run_result run_seeds_on_host(const seed_plan& plan, const std::vector<std::uint64_t>& seeds) {
  seed_run_result result;
  const int d = plan.problem.d;
  size_result(result, d, seeds);
  with_dim(d, [&](auto bound) {
    constexpr int D = decltype(bound)::value;
    for (std::size_t i = 0; i < seeds.size(); ++i)
      store_outcome(result, i,
                    simulate<D>(plan.problem, plan.method, plan.run, plan.x0.data(), seeds[i],
                                result.x_final.data() + i * static_cast<std::size_t>(d)));
  });
  return result;
}

}  // namespace saddlescape::cuda::detail
