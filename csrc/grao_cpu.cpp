// Binding for the native CPU backend: argument checks with readable errors,
// and the grao_native:: custom ops (schemas here, fake implementations in
// grao_kernels/backends/native_backend.py). The kernels live in
// linear_logprobs_cpu.h.
#include <torch/library.h>

#include <sstream>
#include <string>
#include <tuple>

#include "linear_logprobs_cpu.h"

namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_float(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "grao_native: ", name, " must be a CPU tensor, got one on ", t.device());
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "grao_native: ", name,
              " must be float32, bfloat16 or float16, got ", d, " with shape ", shape_of(t));
}

void check_vector(const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "grao_native: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "grao_native: ", name, " must have shape (", n, ",), got ",
              shape_of(t));
  TORCH_CHECK(t.scalar_type() == dtype, "grao_native: ", name, " must be ", dtype, ", got ", t.scalar_type());
}

grao::Problem make_problem(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           const at::Tensor& targets, double temperature, double logit_scale,
                           c10::optional<double> softcap, int64_t ignore_index, int64_t block_rows,
                           int64_t tile_vocab) {
  check_float("hidden", hidden);
  check_float("weight", weight);
  TORCH_CHECK(hidden.dim() == 2, "grao_native: hidden must be (N, H), got shape ", shape_of(hidden));
  TORCH_CHECK(weight.dim() == 2, "grao_native: weight must be (V, H), got shape ", shape_of(weight));
  TORCH_CHECK(weight.size(1) == hidden.size(1), "grao_native: hidden ", shape_of(hidden), " has H=", hidden.size(1),
              " but weight ", shape_of(weight), " has H=", weight.size(1));
  const int64_t N = hidden.size(0), V = weight.size(0);
  check_vector("targets", targets, N, at::kLong);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "grao_native: temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(logit_scale > 0 && std::isfinite(logit_scale), "grao_native: logit_scale must be finite and > 0, got ",
              logit_scale);
  TORCH_CHECK(!softcap.has_value() || (*softcap > 0 && std::isfinite(*softcap)),
              "grao_native: softcap must be None or finite and > 0, got ", softcap.value_or(0.0));
  TORCH_CHECK(block_rows > 0 && tile_vocab > 0, "grao_native: block_rows and tile_vocab must be > 0, got ",
              block_rows, " and ", tile_vocab);

  // Detached: the kernels run ATen ops on worker threads, where the caller's
  // autograd exclusion does not apply; no input may look differentiable there.
  grao::Problem p;
  p.hidden = hidden.detach();
  p.weight = weight.detach().contiguous();
  p.targets = targets.contiguous();
  // The factors in double, rounded once to float.
  const double mul = softcap.has_value() ? logit_scale / *softcap : logit_scale / temperature;
  p.mul = static_cast<float>(mul);
  p.k = static_cast<float>(logit_scale / temperature);
  if (softcap.has_value()) {
    p.cap_out = static_cast<float>(*softcap / temperature);
    p.inv_cap = static_cast<float>(temperature / *softcap);
  }
  if (bias.has_value()) {
    check_float("bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, "grao_native: bias must be (V,) = (", V,
                ",) to match weight ", shape_of(weight), ", got ", shape_of(*bias));
    p.bias_scaled = bias->detach().to(at::kDouble).mul(mul).to(at::kFloat).contiguous();
  }
  const at::Tensor valid = p.targets.ne(ignore_index);
  if (valid.any().item<bool>()) {
    const at::Tensor t = p.targets.masked_select(valid);
    const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "grao_native: targets hold ids in [", lo, ", ", hi, "], outside [0, V=", V,
                ") and not ignore_index=", ignore_index);
  }
  p.ignore_index = ignore_index;
  p.block_rows = block_rows;
  p.tile_vocab = tile_vocab;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, double temperature, double logit_scale, c10::optional<double> softcap,
    int64_t ignore_index, bool entropy, int64_t block_rows, int64_t tile_vocab) {
  grao::Problem p = make_problem(hidden, weight, bias, targets, temperature, logit_scale, softcap, ignore_index,
                                 block_rows, tile_vocab);
  p.entropy = entropy;
  grao::Result r = grao::run(p, grao::Mode::kForward);
  return {r.logp, r.lse, r.ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& coef, const c10::optional<at::Tensor>& ent_coef,
    const c10::optional<at::Tensor>& lse, const c10::optional<at::Tensor>& entropy, double temperature,
    double logit_scale, c10::optional<double> softcap, int64_t ignore_index, bool need_hidden, bool need_weight,
    bool need_bias, int64_t block_rows, int64_t tile_vocab) {
  grao::Problem p = make_problem(hidden, weight, bias, targets, temperature, logit_scale, softcap, ignore_index,
                                 block_rows, tile_vocab);
  const int64_t N = hidden.size(0);
  check_vector("coef", coef, N, at::kFloat);
  p.coef = coef.detach().contiguous();
  if (ent_coef.has_value()) {
    check_vector("ent_coef", *ent_coef, N, at::kFloat);
    p.ent_coef = ent_coef->detach().contiguous();
  }
  // The saved statistics are used only when they hold everything the
  // gradient needs; otherwise they are recomputed in the one-sweep mode.
  const bool reuse = lse.has_value() && (!ent_coef.has_value() || entropy.has_value());
  if (reuse) {
    check_vector("lse", *lse, N, at::kFloat);
    p.lse_in = lse->detach().contiguous();
    if (ent_coef.has_value()) {
      check_vector("entropy", *entropy, N, at::kFloat);
      p.ent_in = entropy->detach().contiguous();
    }
  }
  p.need_h = need_hidden;
  p.need_w = need_weight;
  p.need_b = need_bias;
  grao::Result r = grao::run(p, reuse ? grao::Mode::kGradWithStats : grao::Mode::kGrad);
  return {r.logp, r.lse, r.ent, r.dh, r.dw, r.db};
}

}  // namespace

// A tensor that is not computed (the entropy unless asked for, a gradient not
// needed, dbias without a bias) is returned with shape (0,): schemas cannot
// return an optional tensor.
TORCH_LIBRARY(grao_native, m) {
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
      "float logit_scale, float? softcap, int ignore_index, bool entropy, int block_rows, int tile_vocab) "
      "-> (Tensor logp, Tensor lse, Tensor entropy)");
  m.def(
      "linear_logprobs_grad(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor coef, "
      "Tensor? ent_coef, Tensor? lse, Tensor? entropy, float temperature, float logit_scale, float? softcap, "
      "int ignore_index, bool need_hidden, bool need_weight, bool need_bias, int block_rows, int tile_vocab) "
      "-> (Tensor logp, Tensor lse, Tensor entropy, Tensor dhidden, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(grao_native, CPU, m) {
  m.impl("linear_logprobs_forward", &linear_logprobs_forward);
  m.impl("linear_logprobs_grad", &linear_logprobs_grad);
}
