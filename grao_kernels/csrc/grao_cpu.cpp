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
                           const at::Tensor& targets, double temperature, int64_t ignore_index, int64_t block_rows,
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
  TORCH_CHECK(block_rows > 0 && tile_vocab > 0, "grao_native: block_rows and tile_vocab must be > 0, got ",
              block_rows, " and ", tile_vocab);

  // Detached: the kernels run ATen ops on worker threads, where the caller's
  // autograd exclusion does not apply; no input may look differentiable there.
  grao::Problem p;
  p.hidden = hidden.detach();
  p.weight = weight.detach().contiguous();
  p.targets = targets.contiguous();
  if (bias.has_value()) {
    check_float("bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, "grao_native: bias must be (V,) = (", V,
                ",) to match weight ", shape_of(weight), ", got ", shape_of(*bias));
    p.bias_scaled = bias->detach().to(at::kFloat).mul(1.0 / temperature).contiguous();
  }
  const at::Tensor valid = p.targets.ne(ignore_index);
  if (valid.any().item<bool>()) {
    const at::Tensor t = p.targets.masked_select(valid);
    const int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "grao_native: targets hold ids in [", lo, ", ", hi, "], outside [0, V=", V,
                ") and not ignore_index=", ignore_index);
  }
  p.temperature = temperature;
  p.ignore_index = ignore_index;
  p.block_rows = block_rows;
  p.tile_vocab = tile_vocab;
  return p;
}

std::tuple<at::Tensor, at::Tensor> linear_logprobs_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias,
                                                           const at::Tensor& targets, double temperature,
                                                           int64_t ignore_index, int64_t block_rows,
                                                           int64_t tile_vocab) {
  grao::Problem p =
      make_problem(hidden, weight, bias, targets, temperature, ignore_index, block_rows, tile_vocab);
  grao::Result r = grao::run(p, grao::Mode::kForward);
  return {r.logp, r.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_grad(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& coef, double temperature, int64_t ignore_index,
    const c10::optional<at::Tensor>& lse, int64_t block_rows, int64_t tile_vocab) {
  grao::Problem p =
      make_problem(hidden, weight, bias, targets, temperature, ignore_index, block_rows, tile_vocab);
  check_vector("coef", coef, hidden.size(0), at::kFloat);
  p.coef = coef.detach().contiguous();
  if (lse.has_value()) {
    check_vector("lse", *lse, hidden.size(0), at::kFloat);
    p.lse_in = lse->detach().contiguous();
  }
  grao::Result r = grao::run(p, lse.has_value() ? grao::Mode::kGradWithLse : grao::Mode::kGrad);
  return {r.logp, r.dh, r.dw, r.db};
}

}  // namespace

// db is a (0,)-shaped tensor when there is no bias: schemas cannot return an
// optional tensor.
TORCH_LIBRARY(grao_native, m) {
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, "
      "int ignore_index, int block_rows, int tile_vocab) -> (Tensor logp, Tensor lse)");
  m.def(
      "linear_logprobs_grad(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor coef, "
      "float temperature, int ignore_index, Tensor? lse, int block_rows, int tile_vocab) "
      "-> (Tensor logp, Tensor dhidden, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(grao_native, CPU, m) {
  m.impl("linear_logprobs_forward", &linear_logprobs_forward);
  m.impl("linear_logprobs_grad", &linear_logprobs_grad);
}
