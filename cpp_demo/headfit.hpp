// The new head on frozen features, as edgetransfer/headfit.py fits it (the same objective,
// L-BFGS with torch's strong-Wolfe line search, epochs, patience and best epoch), in plain C++
// on float64: standardised features, multinomial logistic regression, (l2/2)|theta|^2 on the
// weight and the bias, optional class weights. et_learn's solver; see headfit.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace et {

// headfit.py's constants (HEAD_L2 and the L-BFGS limits); config.EPOCHS and PATIENCE.
constexpr double kHeadL2 = 1e-3;
constexpr int kEpochs = 30;
constexpr int kPatience = 10;

struct HeadFitResult {
  int classes = 0, dim = 0;
  std::vector<float> weight;  // (C, D) row-major, standardisation folded in
  std::vector<float> bias;    // (C)
  int best_epoch = 0, epochs_run = 0;
  double val_top1 = 0, val_loss = 0;
  std::vector<int> val_pred;  // argmax of the best epoch's validation logits
  bool stopped_early = false;
};

// x_train (N, D) and x_val (M, D) float32 row-major; labels in 0..classes-1.
// class_weights: empty, or `classes` weights (--balance: balanced_class_weights).
HeadFitResult fit_head(const std::vector<float>& x_train, const std::vector<int>& y_train,
                       const std::vector<float>& x_val, const std::vector<int>& y_val, int classes,
                       int dim, double l2, const std::vector<float>& class_weights, int epochs,
                       int patience);

// headfit.balanced_class_weights: N / (classes * count), float32.
std::vector<float> balanced_class_weights(const std::vector<int>& y, int classes);

}  // namespace et
