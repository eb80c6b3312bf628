// A line-by-line port of edgetransfer/headfit.py (which follows torch.optim.LBFGS with
// line_search_fn="strong_wolfe"), so that both reach the same optimum by the same steps:
// tests/test_et_learn.py compares the two.
#include "headfit.hpp"

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <stdexcept>

namespace et {
namespace {

using Vec = std::vector<double>;

constexpr int kHistory = 10;
constexpr int kIterations = 20;
constexpr double kToleranceGrad = 1e-5;
constexpr double kToleranceChange = 1e-9;
constexpr int kMaxEvals = kIterations * 5 / 4;
constexpr double kC1 = 1e-4, kC2 = 0.9;

double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
double max_abs(const Vec& a) {
  double m = 0;
  for (double v : a) m = std::max(m, std::abs(v));
  return m;
}
Vec axpy(const Vec& x, double t, const Vec& d) {  // x + t * d
  Vec r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = x[i] + t * d[i];
  return r;
}

// The objective on standardised rows x (R, D): weighted mean cross-entropy + (l2/2)|theta|^2,
// theta = [weight (C*D, row-major), bias (C)].
struct Loss {
  const Vec& x;
  const std::vector<int>& y;
  int classes, dim;
  double l2;
  Vec scale;  // each row's share of the mean

  // logits (R, C) and log-softmax of every row
  void ce(const Vec& theta, Vec& z, Vec& logp) const {
    const size_t rows = y.size();
    z.assign(rows * classes, 0.0);
    logp.assign(rows * classes, 0.0);
    for (size_t r = 0; r < rows; ++r) {
      const double* xr = &x[r * dim];
      for (int c = 0; c < classes; ++c) {
        const double* w = &theta[size_t(c) * dim];
        double s = 0;
        for (int k = 0; k < dim; ++k) s += xr[k] * w[k];
        z[r * classes + c] = s + theta[size_t(classes) * dim + c];
      }
      double m = -std::numeric_limits<double>::infinity();
      for (int c = 0; c < classes; ++c) m = std::max(m, z[r * classes + c]);
      double sum = 0;
      for (int c = 0; c < classes; ++c) sum += std::exp(z[r * classes + c] - m);
      const double lse = std::log(sum);
      for (int c = 0; c < classes; ++c) logp[r * classes + c] = z[r * classes + c] - m - lse;
    }
  }

  double value_and_grad(const Vec& theta, Vec& grad) const {
    Vec z, logp;
    ce(theta, z, logp);
    const size_t rows = y.size();
    double loss = 0;
    for (size_t r = 0; r < rows; ++r) loss -= scale[r] * logp[r * classes + y[r]];
    grad.assign(theta.size(), 0.0);
    if (!std::isfinite(loss)) return std::numeric_limits<double>::infinity();
    for (size_t r = 0; r < rows; ++r) {
      const double* xr = &x[r * dim];
      for (int c = 0; c < classes; ++c) {
        double g = std::exp(logp[r * classes + c]) - (c == y[r] ? 1.0 : 0.0);
        g *= scale[r];
        double* gw = &grad[size_t(c) * dim];
        for (int k = 0; k < dim; ++k) gw[k] += g * xr[k];
        grad[size_t(classes) * dim + c] += g;
      }
    }
    if (l2 != 0) {
      loss += 0.5 * l2 * dot(theta, theta);
      for (size_t i = 0; i < theta.size(); ++i) grad[i] += l2 * theta[i];
    }
    return loss;
  }

  // (loss without the penalty, top-1) on the training rows
  std::pair<double, double> metrics(const Vec& theta) const {
    Vec z, logp;
    ce(theta, z, logp);
    double loss = 0;
    size_t right = 0;
    for (size_t r = 0; r < y.size(); ++r) {
      loss -= scale[r] * logp[r * classes + y[r]];
      right += argmax(&z[r * classes]) == y[r];
    }
    return {loss, double(right) / double(y.size())};
  }

  int argmax(const double* row) const {
    int best = 0;
    for (int c = 1; c < classes; ++c)
      if (row[c] > row[best]) best = c;
    return best;
  }
};

double cubic_interpolate(double x1, double f1, double g1, double x2, double f2, double g2,
                         const double* bounds) {
  double lo, hi;
  if (bounds) {
    lo = bounds[0];
    hi = bounds[1];
  } else if (x1 <= x2) {
    lo = x1;
    hi = x2;
  } else {
    lo = x2;
    hi = x1;
  }
  const double d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2);
  const double d2_square = d1 * d1 - g1 * g2;
  if (d2_square >= 0) {
    const double d2 = std::sqrt(d2_square);
    double pos;
    if (x1 <= x2)
      pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2));
    else
      pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2));
    return std::min(std::max(pos, lo), hi);  // NaN stays NaN, as Python's min/max
  }
  return (lo + hi) / 2.0;
}

struct LineResult {
  double f;
  Vec g;
  double t;
  int evals;
};

LineResult strong_wolfe(const Loss& fun, const Vec& x, double t, const Vec& d, double f,
                        const Vec& g, double gtd, int max_ls) {
  const double d_norm = max_abs(d);
  Vec g_new;
  double f_new = fun.value_and_grad(axpy(x, t, d), g_new);
  int evals = 1;
  double gtd_new = dot(g_new, d);
  double t_prev = 0, f_prev = f, gtd_prev = gtd;
  Vec g_prev = g;
  bool done = false;
  int ls_iter = 0;
  double br[2] = {0, 0}, br_f[2] = {0, 0}, br_gtd[2] = {0, 0};
  Vec br_g[2];
  int n_br = 0;
  while (ls_iter < max_ls) {
    if (f_new > (f + kC1 * t * gtd) || (ls_iter > 1 && f_new >= f_prev)) {
      br[0] = t_prev, br[1] = t, br_f[0] = f_prev, br_f[1] = f_new;
      br_g[0] = g_prev, br_g[1] = g_new, br_gtd[0] = gtd_prev, br_gtd[1] = gtd_new;
      n_br = 2;
      break;
    }
    if (std::abs(gtd_new) <= -kC2 * gtd) {
      br[0] = t, br_f[0] = f_new, br_g[0] = g_new;
      n_br = 1;
      done = true;
      break;
    }
    if (gtd_new >= 0) {
      br[0] = t_prev, br[1] = t, br_f[0] = f_prev, br_f[1] = f_new;
      br_g[0] = g_prev, br_g[1] = g_new, br_gtd[0] = gtd_prev, br_gtd[1] = gtd_new;
      n_br = 2;
      break;
    }
    const double bounds[2] = {t + 0.01 * (t - t_prev), t * 10};
    const double t_next = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds);
    t_prev = t;
    t = t_next;
    f_prev = f_new, g_prev = g_new, gtd_prev = gtd_new;
    f_new = fun.value_and_grad(axpy(x, t, d), g_new);
    ++evals;
    gtd_new = dot(g_new, d);
    ++ls_iter;
  }
  if (ls_iter == max_ls) {
    br[0] = 0, br[1] = t, br_f[0] = f, br_f[1] = f_new, br_g[0] = g, br_g[1] = g_new;
    n_br = 2;
  }
  bool insuf_progress = false;
  int low = br_f[0] <= br_f[n_br - 1] ? 0 : 1, high = 1 - low;
  while (!done && ls_iter < max_ls) {
    if (std::abs(br[1] - br[0]) * d_norm < kToleranceChange) break;
    t = cubic_interpolate(br[0], br_f[0], br_gtd[0], br[1], br_f[1], br_gtd[1], nullptr);
    const double bmax = std::max(br[0], br[1]), bmin = std::min(br[0], br[1]);
    const double eps = 0.1 * (bmax - bmin);
    if (std::min(bmax - t, t - bmin) < eps) {
      if (insuf_progress || t >= bmax || t <= bmin) {
        t = std::abs(t - bmax) < std::abs(t - bmin) ? bmax - eps : bmin + eps;
        insuf_progress = false;
      } else {
        insuf_progress = true;
      }
    } else {
      insuf_progress = false;
    }
    f_new = fun.value_and_grad(axpy(x, t, d), g_new);
    ++evals;
    gtd_new = dot(g_new, d);
    ++ls_iter;
    if (f_new > (f + kC1 * t * gtd) || f_new >= br_f[low]) {
      br[high] = t, br_f[high] = f_new, br_g[high] = g_new, br_gtd[high] = gtd_new;
      low = br_f[0] <= br_f[1] ? 0 : 1;
      high = 1 - low;
    } else {
      if (std::abs(gtd_new) <= -kC2 * gtd) {
        done = true;
      } else if (gtd_new * (br[high] - br[low]) >= 0) {
        br[high] = br[low], br_f[high] = br_f[low];
        br_g[high] = br_g[low], br_gtd[high] = br_gtd[low];
      }
      br[low] = t, br_f[low] = f_new, br_g[low] = g_new, br_gtd[low] = gtd_new;
    }
  }
  return {br_f[low], br_g[low], br[low], evals};
}

// torch.optim.LBFGS's state, carried from one step (epoch) to the next.
struct LBFGS {
  double tolerance_grad;
  long n_iter = 0;
  Vec d;
  double t = 1.0;
  std::deque<Vec> old_dirs, old_stps;
  std::deque<double> ro;
  double h_diag = 1.0;
  Vec prev_grad;
  double prev_loss = std::nan("");

  Vec step(const Loss& fun, Vec x) {
    Vec grad;
    double loss = fun.value_and_grad(x, grad);
    int evals = 1;
    if (max_abs(grad) <= tolerance_grad) return x;
    Vec dd = d;
    double tt = t;
    for (int n = 1; n <= kIterations; ++n) {
      ++n_iter;
      if (n_iter == 1) {
        dd.resize(grad.size());
        for (size_t i = 0; i < grad.size(); ++i) dd[i] = -grad[i];
        old_dirs.clear(), old_stps.clear(), ro.clear();
        h_diag = 1.0;
      } else {
        dd = direction(grad, dd, tt);
      }
      prev_grad = grad;
      prev_loss = loss;
      if (n_iter == 1) {
        double l1 = 0;
        for (double v : grad) l1 += std::abs(v);
        tt = std::min(1.0, 1.0 / l1);
      } else {
        tt = 1.0;
      }
      const double gtd = dot(grad, dd);
      if (gtd > -kToleranceChange) break;
      LineResult ls = strong_wolfe(fun, x, tt, dd, loss, grad, gtd, kMaxEvals - evals);
      loss = ls.f;
      grad = std::move(ls.g);
      tt = ls.t;
      x = axpy(x, tt, dd);
      evals += ls.evals;
      if (n == kIterations || evals >= kMaxEvals) break;
      if (max_abs(grad) <= tolerance_grad) break;
      double step_max = 0;
      for (double v : dd) step_max = std::max(step_max, std::abs(v * tt));
      if (step_max <= kToleranceChange) break;
      if (std::abs(loss - prev_loss) < kToleranceChange) break;
    }
    d = dd;
    t = tt;
    return x;
  }

  Vec direction(const Vec& grad, const Vec& dd, double tt) {
    Vec y(grad.size()), s(grad.size());
    for (size_t i = 0; i < grad.size(); ++i) y[i] = grad[i] - prev_grad[i], s[i] = dd[i] * tt;
    const double ys = dot(y, s);
    if (ys > 1e-10) {
      if (old_dirs.size() == size_t(kHistory)) {
        old_dirs.pop_front(), old_stps.pop_front(), ro.pop_front();
      }
      old_dirs.push_back(y);
      old_stps.push_back(s);
      ro.push_back(1.0 / ys);
      h_diag = ys / dot(y, y);
    }
    Vec q(grad.size());
    for (size_t i = 0; i < grad.size(); ++i) q[i] = -grad[i];
    std::vector<double> al(old_dirs.size());
    for (int i = int(old_dirs.size()) - 1; i >= 0; --i) {
      al[i] = dot(old_stps[i], q) * ro[i];
      for (size_t k = 0; k < q.size(); ++k) q[k] -= al[i] * old_dirs[i][k];
    }
    Vec r(q.size());
    for (size_t k = 0; k < q.size(); ++k) r[k] = q[k] * h_diag;
    for (size_t i = 0; i < old_dirs.size(); ++i) {
      const double be = dot(old_dirs[i], r) * ro[i];
      for (size_t k = 0; k < r.size(); ++k) r[k] += (al[i] - be) * old_stps[i][k];
    }
    return r;
  }
};

}  // namespace

std::vector<float> balanced_class_weights(const std::vector<int>& y, int classes) {
  std::vector<float> counts(classes, 0.0f);
  for (int v : y) counts[v] += 1.0f;
  float total = 0;
  for (float c : counts) total += c;
  std::vector<float> w(classes);
  for (int c = 0; c < classes; ++c) w[c] = total / (float(classes) * std::max(counts[c], 1.0f));
  return w;
}

HeadFitResult fit_head(const std::vector<float>& x_train, const std::vector<int>& y_train,
                       const std::vector<float>& x_val, const std::vector<int>& y_val, int classes,
                       int dim, double l2, const std::vector<float>& class_weights, int epochs,
                       int patience) {
  const size_t n = y_train.size(), m = y_val.size();
  if (epochs < 1) throw std::invalid_argument("epochs must be at least 1");
  // Standardization.of: mean, sample std; (nearly) constant features keep scale 1
  Vec mean(dim, 0.0), stdev(dim, 1.0);
  for (size_t r = 0; r < n; ++r)
    for (int k = 0; k < dim; ++k) mean[k] += double(x_train[r * dim + k]);
  for (int k = 0; k < dim; ++k) mean[k] /= double(n);
  if (n > 1) {
    double avg = 0;
    for (int k = 0; k < dim; ++k) {
      double ss = 0;
      for (size_t r = 0; r < n; ++r) {
        const double v = double(x_train[r * dim + k]) - mean[k];
        ss += v * v;
      }
      stdev[k] = std::sqrt(ss / double(n - 1));
      avg += stdev[k];
    }
    avg /= dim;
    for (int k = 0; k < dim; ++k)
      if (!(stdev[k] > 1e-3 * avg + 1e-8)) stdev[k] = 1.0;
  }
  auto standardise = [&](const std::vector<float>& x, size_t rows) {
    Vec out(rows * dim);
    for (size_t r = 0; r < rows; ++r)
      for (int k = 0; k < dim; ++k) out[r * dim + k] = (double(x[r * dim + k]) - mean[k]) / stdev[k];
    return out;
  };
  const Vec xs = standardise(x_train, n), xvs = standardise(x_val, m);
  Loss loss{xs, y_train, classes, dim, l2, Vec(n, 1.0)};
  if (!class_weights.empty())
    for (size_t r = 0; r < n; ++r) loss.scale[r] = double(class_weights[y_train[r]]);
  double wsum = 0;
  for (double v : loss.scale) wsum += v;
  for (double& v : loss.scale) v /= wsum;

  auto val_metrics = [&](const Vec& theta, std::vector<int>& pred) -> std::pair<double, double> {
    Vec z, logp;
    Loss val{xvs, y_val, classes, dim, 0.0, {}};
    val.ce(theta, z, logp);
    pred.assign(m, 0);
    if (!m) return {std::nan(""), std::nan("")};
    double l = 0;
    size_t right = 0;
    for (size_t r = 0; r < m; ++r) {
      l -= logp[r * classes + y_val[r]];
      pred[r] = val.argmax(&z[r * classes]);
      right += pred[r] == y_val[r];
    }
    return {l / double(m), double(right) / double(m)};
  };

  Vec theta(size_t(classes) * (dim + 1), 0.0);
  LBFGS solver{kToleranceGrad};
  HeadFitResult res;
  res.classes = classes, res.dim = dim;
  bool have_best = false;
  double best_top1 = 0, best_loss = 0;
  Vec best_theta;
  int stale = 0;
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    const Vec before = theta;
    theta = solver.step(loss, theta);
    const bool converged = before == theta;
    const auto [train_loss, train_top1] = loss.metrics(theta);
    (void)train_top1;
    if (!std::isfinite(train_loss))
      throw std::runtime_error("the head's loss became " + std::to_string(train_loss) + " in epoch " +
                               std::to_string(epoch) + "; the features are probably out of range");
    std::vector<int> pred;
    const auto [val_loss, val_top1] = val_metrics(theta, pred);
    res.epochs_run = epoch;
    // (val_top1, -val_loss) > best's, as Python compares tuples (NaN compares false)
    const bool better = !have_best || val_top1 > best_top1 ||
                        (val_top1 == best_top1 && -val_loss > -best_loss);
    if (better) {
      have_best = true;
      best_top1 = val_top1, best_loss = val_loss, best_theta = theta;
      res.best_epoch = epoch;
      res.val_pred = pred;
      stale = 0;
    } else {
      ++stale;
    }
    if ((patience && stale >= patience) || converged) {
      res.stopped_early = true;
      break;
    }
  }
  res.val_top1 = best_top1, res.val_loss = best_loss;
  // fold: weight / std, bias - (weight / std) @ mean
  res.weight.resize(size_t(classes) * dim);
  res.bias.resize(classes);
  for (int c = 0; c < classes; ++c) {
    double b = best_theta[size_t(classes) * dim + c];
    for (int k = 0; k < dim; ++k) {
      const double w = best_theta[size_t(c) * dim + k] / stdev[k];
      res.weight[size_t(c) * dim + k] = float(w);
      b -= w * mean[k];
    }
    res.bias[c] = float(b);
  }
  return res;
}

}  // namespace et
