// Fused linear-head log-probs, entropies and gradients on the CPU, never
// holding the (N, V) logits. Implements the backend contract of
// grao_kernels/backends/__init__.py.
//
// Equivalent eager PyTorch (float32 compute, every input upcast):
//
//   raw  = hidden @ weight.T + bias                          # (N, V)
//   z    = softcap * tanh(logit_scale * raw / softcap) / T   # with a softcap
//   z    = logit_scale * raw / T                             # without
//   lse  = z.logsumexp(-1);  logp = z[n, targets[n]] - lse;  p = z.softmax(-1)
//   ent  = lse - (p * z).sum(-1)                             # all 0 where targets == ignore_index
//   g_z  = coef (onehot(targets) - p) - ent_coef p (z - lse + ent)
//   g    = logit_scale / T * g_z * (1 - (T z / softcap)^2 if softcap else 1)
//   dh   = g @ weight;  dw = g.T @ hidden;  db = g.sum(0)    # grads of sum coef logp + ent_coef ent
//
// Floor. The three products z = h W^T, dh = g W and dw = g^T h are 2 N V H
// FLOPs each, 6 N V H in all (8192 x 65536 x 256: 825 GFLOP; 2048 x 151936 x
// 1024: 1.9 TFLOP); nothing else is O(N V H). A gradient not needed skips its
// product (a frozen head: no dw; no dh when hidden needs none). Compulsory
// memory traffic is the inputs and the float32 gradients, O((N + V) H). The
// unfused eager code adds a (N, V) float32 buffer written once and read about
// four times (2 GB at the first shape); here it never exists.
//
// Schedule. Valid rows (target != ignore_index; ignored rows cost nothing)
// are taken in blocks of R rows; the vocabulary in tiles of VT entries.
// The tiles are grouped into a fixed number of chunks of consecutive tiles;
// threads take chunks dynamically (one slowed by other load on a shared
// machine just does fewer) and call a single-threaded BLAS GEMM per tile.
// dh is summed per chunk, then over chunks in order, and every other sum
// (a tile's statistics, dw and db of a tile) belongs to one tile, so the
// order of every floating-point sum outside the GEMMs is fixed by (R, VT)
// alone, whatever the thread count or schedule; each GEMM runs on one BLAS
// thread (BlasOneThread), so its own order is fixed too.
//
//   stats, per tile: Z = h_blk W_t^T (R x VT, in L2), z = head(Z + b),
//     m = rowmax, s = rowsum exp(z - m), q = rowsum exp(z - m) (z - m)
//     (q only for the entropy). The target logit is read from its tile.
//   combine (double): M = max_t m_t, S = sum_t s_t e^(m_t - M),
//     Q = sum_t e^(m_t - M) (q_t + (m_t - M) s_t); lse = M + log S,
//     ent = log S - Q / S. A tile whose every entry is masked (-inf) has
//     s_t = 0 and its max is never used as a shift (no -inf - -inf).
//   grad, per tile: g from z, lse, ent in place (vec_math.h dlogits) plus
//     the one-hot term, then dh_part[chunk] += g W_t, dw_t += g^T h_blk,
//     db_t += colsum(g), each only when needed.
//
// With the lse (and the entropy, when ent_coef is given) known from an
// earlier forward, and for the forward alone, each tile is computed once:
// stats or grad right after its GEMM while it sits in L2, and the working
// memory is one tile per thread. Without them (the one-sweep loss and
// gradient), z of a whole row block waits for the combine step: an R x V
// float32 buffer is the only working memory that scales with V (R is chosen
// from the memory budget by the Python launcher), read once more for the
// gradient (a second exp per logit, the price of having z for the entropy
// and softcap terms). dw is read and written once per row block, 8 V H bytes
// for 6 R V H FLOPs, so R in the hundreds keeps that traffic well under the
// compute time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace grao {

enum class Mode { kForward, kGrad, kGradWithStats };

struct Problem {
  at::Tensor hidden;            // (N, H), any float dtype and strides
  at::Tensor weight;            // (V, H) contiguous
  at::Tensor bias_scaled;       // (V,) float32 = bias * mul, or undefined
  at::Tensor targets;           // (N,) int64 contiguous
  at::Tensor coef;              // (N,) float32 contiguous (grad modes)
  at::Tensor ent_coef;          // (N,) float32 contiguous or undefined (grad modes)
  at::Tensor lse_in, ent_in;    // (N,) float32 contiguous (kGradWithStats; ent_in with ent_coef)
  // The head: z = cap_out * tanh(raw * mul) with a softcap (mul = scale /
  // cap, cap_out = cap / T), z = raw * mul without (mul = scale / T).
  float mul = 1.0f, cap_out = 0.0f;
  float k = 1.0f;               // logit_scale / T: d z / d raw without the softcap slope
  float inv_cap = 0.0f;         // T / softcap: z * inv_cap = tanh(.)
  bool entropy = false;         // forward: compute the entropy
  bool need_h = true, need_w = true, need_b = true;
  int64_t ignore_index = -100;
  int64_t block_rows = 256;
  int64_t tile_vocab = 256;
};

struct Result {
  at::Tensor logp, lse, ent, dh, dw, db;  // ent, dh, dw, db: (0,) when not computed
};

// A non-owning float32 matrix view; never requires grad, so it is safe to use
// in GEMMs on worker threads whatever the caller's autograd state.
inline at::Tensor view2d(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// One BLAS thread per GEMM, whatever the caller's thread settings.
//
// The order of the sums inside a GEMM is BLAS's choice, and MKL may make it
// from the number of threads it may use. Inside ATen's OpenMP region (two or
// more threads) MKL runs sequentially by default; with one thread,
// at::parallel_for runs the body inline, outside any region, where MKL's
// limit is whatever torch.set_num_threads or MKL_NUM_THREADS left it. Pinning
// MKL to one thread on every calling thread for the duration of a chunk loop
// makes every GEMM take the same sequential path in both cases (also with
// MKL_DYNAMIC=FALSE and nested OpenMP, where MKL would otherwise spawn
// threads inside the region), so the thread count cannot change a result by
// construction rather than by MKL's defaults.
//
// MKL_Set_Num_Threads_Local (the C entry point; mkl_set_num_threads_local is
// the Fortran one, taking a pointer) is looked up at run time, so the
// extension links and runs against a PyTorch built without MKL (OpenBLAS,
// Accelerate); there the guard does nothing and README's determinism note
// says what holds.
class BlasOneThread {
 public:
  BlasOneThread() {
    if (set_local() != nullptr) previous_ = set_local()(1);
  }
  ~BlasOneThread() {
    // MKL: 0 restores the global setting, which is what previous_ holds when
    // no local setting was active.
    if (set_local() != nullptr) set_local()(previous_);
  }
  BlasOneThread(const BlasOneThread&) = delete;
  BlasOneThread& operator=(const BlasOneThread&) = delete;

  // Whether the guard has an effect here (PyTorch is linked with MKL).
  static bool active() { return set_local() != nullptr; }

 private:
  using SetLocal = int (*)(int);
  static SetLocal set_local() {
    static const SetLocal fn = [] {
      void* sym = dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local");
      // libtorch_cpu (which carries MKL) is loaded without RTLD_GLOBAL.
      if (sym == nullptr) {
        if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) sym = dlsym(lib, "MKL_Set_Num_Threads_Local");
      }
      return reinterpret_cast<SetLocal>(sym);
    }();
    return fn;
  }
  int previous_ = 0;
};

// Calls body(chunk, thread) once for every chunk in [0, n_chunks), handing
// chunks out dynamically to the threads of ATen's pool, each thread's GEMMs
// on one BLAS thread.
template <typename F>
inline void for_each_chunk(int64_t n_chunks, int n_threads, const F& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
    const BlasOneThread one_blas_thread;
    const int tid = at::get_thread_num();
    for (int64_t c = next.fetch_add(1); c < n_chunks; c = next.fetch_add(1)) body(c, tid);
  });
}

// 16 chunks: a thread preempted by other load while holding the last chunk
// of a pass stalls the other for at most 1/16 of that pass; the dh partials
// cost 16 x rows x H float32.
constexpr int64_t kChunks = 16;

inline Result run(const Problem& P, Mode mode) {
  const int64_t N = P.hidden.size(0), H = P.hidden.size(1), V = P.weight.size(0);
  const bool grad = mode != Mode::kForward;
  const bool has_bias = P.bias_scaled.defined();
  const bool has_ec = grad && P.ent_coef.defined();
  const bool want_ent = grad ? has_ec : P.entropy;
  const bool need_h = grad && P.need_h, need_w = grad && P.need_w, need_b = grad && P.need_b && has_bias;
  const bool cap = P.cap_out > 0.0f;
  auto f32 = at::TensorOptions().dtype(at::kFloat);

  Result out;
  out.logp = at::zeros({N}, f32);
  out.lse = at::zeros({N}, f32);
  out.ent = want_ent ? at::zeros({N}, f32) : at::empty({0}, f32);
  out.dh = need_h ? at::zeros({N, H}, f32) : at::empty({0}, f32);
  out.dw = need_w ? at::zeros({V, H}, f32) : at::empty({0}, f32);
  out.db = need_b ? at::zeros({V}, f32) : at::empty({0}, f32);
  const at::Tensor valid = P.targets.ne(P.ignore_index).nonzero().squeeze(1);
  const int64_t n_valid = valid.size(0);
  if (n_valid == 0 || V == 0) return out;

  const int64_t VT = std::max<int64_t>(1, std::min(P.tile_vocab, V));
  const int64_t n_tiles = (V + VT - 1) / VT;
  const int64_t R = std::max<int64_t>(1, std::min(P.block_rows, n_valid));
  const int n_threads = std::max(1, at::get_num_threads());
  const int64_t n_chunks = std::min(kChunks, n_tiles);
  auto chunk_tiles = [&](int64_t c) { return std::make_pair(c * n_tiles / n_chunks, (c + 1) * n_tiles / n_chunks); };
  // Per-thread buffers start on 64-byte boundaries, so BLAS sees the same
  // alignment whichever thread runs a tile.
  const int64_t tile_stride = (R * VT + 15) / 16 * 16, w_stride = (VT * H + 15) / 16 * 16;
  const bool w_f32 = P.weight.scalar_type() == at::kFloat;
  // One row block's logits, tile-major: tile t starts at R * t * VT.
  const bool big_buffer = mode == Mode::kGrad;

  at::Tensor zbuf = big_buffer ? at::empty({R * V}, f32) : at::empty({n_threads, tile_stride}, f32);
  at::Tensor wbuf = w_f32 ? at::Tensor() : at::empty({n_threads, w_stride}, f32);
  at::Tensor dh_part = need_h ? at::zeros({n_chunks, R, H}, f32) : at::Tensor();
  const bool per_tile_stats = mode != Mode::kGradWithStats;
  std::vector<float> m_t(per_tile_stats ? n_tiles * R : 0), s_t(m_t.size()), q_t(want_ent ? m_t.size() : 0);
  std::vector<float> zt(R), lse(R), ent(R, 0.0f), cs(R, 0.0f), ecs(R, 0.0f);
  std::vector<int64_t> tgt(R);

  float* zbuf_p = zbuf.data_ptr<float>();
  float* wbuf_p = w_f32 ? nullptr : wbuf.data_ptr<float>();
  const float* bias_p = has_bias ? P.bias_scaled.data_ptr<float>() : nullptr;
  float* dw_p = need_w ? out.dw.data_ptr<float>() : nullptr;
  float* db_p = need_b ? out.db.data_ptr<float>() : nullptr;
  float* dh_part_p = need_h ? dh_part.data_ptr<float>() : nullptr;

  // W_t as float32 (V_t x H, contiguous): a view of weight, or converted into
  // the calling thread's buffer for bfloat16 / float16 weights.
  auto weight_tile = [&](int64_t v0, int64_t vt, int tid) -> at::Tensor {
    if (w_f32) return view2d(P.weight.data_ptr<float>() + v0 * H, vt, H, H);
    at::Tensor dst = view2d(wbuf_p + tid * w_stride, vt, H, H);
    dst.copy_(P.weight.narrow(0, v0, vt));
    return dst;
  };

  for (int64_t r0 = 0; r0 < n_valid; r0 += R) {
    const int64_t rb = std::min(R, n_valid - r0);
    const at::Tensor idx = valid.narrow(0, r0, rb);
    // h_blk stays hot for the whole vocabulary sweep of this row block.
    at::Tensor hb = P.hidden.index_select(0, idx).to(at::kFloat).contiguous();
    auto gather = [&](const at::Tensor& src, float* dst) {
      at::Tensor t = src.index_select(0, idx);
      std::copy(t.data_ptr<float>(), t.data_ptr<float>() + rb, dst);
    };
    {
      at::Tensor t = P.targets.index_select(0, idx);
      std::copy(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + rb, tgt.begin());
      if (grad) gather(P.coef, cs.data());
      if (has_ec) gather(P.ent_coef, ecs.data());
      if (mode == Mode::kGradWithStats) {
        gather(P.lse_in, lse.data());
        if (has_ec) gather(P.ent_in, ent.data());
      }
    }
    const at::Tensor hb_view = view2d(hb.data_ptr<float>(), rb, H, H);

    // z of tile `tile` (the head applied), its row maxima, the target logit.
    auto logits_tile = [&](int64_t tile, int tid, float* z, at::Tensor& wt) {
      const int64_t v0 = tile * VT, vt = std::min(VT, V - v0);
      wt = weight_tile(v0, vt, tid);
      at::Tensor zv = view2d(z, rb, vt, vt);
      at::mm_out(zv, hb_view, wt.t());
      for (int64_t r = 0; r < rb; ++r) {
        float* row = z + r * vt;
        const float m = head_max(row, vt, P.mul, bias_p ? bias_p + v0 : nullptr, P.cap_out);
        const int64_t local = tgt[r] - v0;
        if (local >= 0 && local < vt) zt[r] = row[local];
        if (per_tile_stats) m_t[tile * rb + r] = m;
      }
    };

    // Softmax partial sums of a tile, shifted by its max (by 0 when the
    // whole row of the tile is masked: s = 0 then).
    auto stats_tile = [&](int64_t tile, const float* z) {
      const int64_t vt = std::min(VT, V - tile * VT);
      for (int64_t r = 0; r < rb; ++r) {
        const int64_t i = tile * rb + r;
        const float shift = m_t[i] == -std::numeric_limits<float>::infinity() ? 0.0f : m_t[i];
        s_t[i] = exp_sums(z + r * vt, vt, shift, want_ent ? &q_t[i] : nullptr);
      }
    };

    // z -> g in place, the one-hot term, then the gradient GEMMs while the
    // tile is still in cache.
    auto grad_tile = [&](int64_t tile, int64_t chunk, float* z, const at::Tensor& wt) {
      const int64_t v0 = tile * VT, vt = std::min(VT, V - v0);
      for (int64_t r = 0; r < rb; ++r) {
        float* row = z + r * vt;
        const float a = -P.k * (cs[r] + ecs[r] * ent[r]), b = -P.k * ecs[r];
        if (has_ec)
          cap ? dlogits<true, true>(row, vt, lse[r], a, b, P.inv_cap) : dlogits<true, false>(row, vt, lse[r], a, b, 0);
        else
          cap ? dlogits<false, true>(row, vt, lse[r], a, b, P.inv_cap) : dlogits<false, false>(row, vt, lse[r], a, b, 0);
        const int64_t local = tgt[r] - v0;
        if (local >= 0 && local < vt) {
          const float t = zt[r] * P.inv_cap;
          row[local] += P.k * cs[r] * (cap ? 1.0f - t * t : 1.0f);
        }
      }
      at::Tensor gv = view2d(z, rb, vt, vt);
      if (need_h) view2d(dh_part_p + chunk * R * H, rb, H, H).addmm_(gv, wt);
      if (need_w) view2d(dw_p + v0 * H, vt, H, H).addmm_(gv.t(), hb_view);
      if (db_p)
        for (int64_t r = 0; r < rb; ++r) add_into(db_p + v0, z + r * vt, vt);
    };

    if (mode == Mode::kGradWithStats) {
      for_each_chunk(n_chunks, n_threads, [&](int64_t c, int tid) {
        float* z = zbuf_p + tid * tile_stride;
        at::Tensor wt;
        const auto [t0, t1] = chunk_tiles(c);
        for (int64_t tile = t0; tile < t1; ++tile) {
          logits_tile(tile, tid, z, wt);
          grad_tile(tile, c, z, wt);
        }
      });
    } else {
      // Statistics pass.
      for_each_chunk(n_chunks, n_threads, [&](int64_t c, int tid) {
        at::Tensor wt;
        const auto [t0, t1] = chunk_tiles(c);
        for (int64_t tile = t0; tile < t1; ++tile) {
          float* z = big_buffer ? zbuf_p + rb * tile * VT : zbuf_p + tid * tile_stride;
          logits_tile(tile, tid, z, wt);
          stats_tile(tile, z);
        }
      });
      // Combine the per-tile sums in double, skipping fully masked tiles.
      for (int64_t r = 0; r < rb; ++r) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n_tiles; ++t)
          if (s_t[t * rb + r] > 0.0f) mx = std::max(mx, m_t[t * rb + r]);
        double s = 0.0, q = 0.0;
        for (int64_t t = 0; t < n_tiles; ++t) {
          const int64_t i = t * rb + r;
          if (!(s_t[i] > 0.0f)) continue;
          const double d = double(m_t[i]) - mx, w = std::exp(d);
          s += double(s_t[i]) * w;
          if (want_ent) q += (double(q_t[i]) + d * s_t[i]) * w;
        }
        const double log_s = std::log(s);
        lse[r] = static_cast<float>(double(mx) + log_s);
        if (want_ent) ent[r] = static_cast<float>(log_s - q / s);
      }
      if (mode == Mode::kGrad) {
        // Gradient pass over the stored logits.
        for_each_chunk(n_chunks, n_threads, [&](int64_t c, int tid) {
          const auto [t0, t1] = chunk_tiles(c);
          for (int64_t tile = t0; tile < t1; ++tile) {
            const int64_t v0 = tile * VT, vt = std::min(VT, V - v0);
            grad_tile(tile, c, zbuf_p + rb * v0, weight_tile(v0, vt, tid));
          }
        });
      }
    }

    // Scatter this block's results back to its rows.
    at::Tensor lse_blk = at::from_blob(lse.data(), {rb}, f32).clone();
    at::Tensor zt_blk = at::from_blob(zt.data(), {rb}, f32);
    out.logp.index_copy_(0, idx, zt_blk - lse_blk);
    out.lse.index_copy_(0, idx, lse_blk);
    if (want_ent) out.ent.index_copy_(0, idx, at::from_blob(ent.data(), {rb}, f32));
    if (need_h) {
      // Chunk partials summed in chunk order into the first.
      for (int64_t c = 1; c < n_chunks; ++c) add_into(dh_part_p, dh_part_p + c * R * H, rb * H);
      out.dh.index_copy_(0, idx, dh_part.select(0, 0).narrow(0, 0, rb));
      dh_part.zero_();
    }
  }
  return out;
}

}  // namespace grao
