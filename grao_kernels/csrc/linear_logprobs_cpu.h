// Fused linear-head log-probs and gradients on the CPU, never holding the
// (N, V) logits.
//
// Equivalent eager PyTorch (float32 compute, every input upcast):
//
//   z    = (hidden @ weight.T + bias) / T                    # (N, V)
//   lse  = z.logsumexp(-1);  logp = z[n, targets[n]] - lse   # 0 where targets == ignore_index
//   dz   = coef[:, None] * (onehot(targets) - softmax(z)) / T
//   dh   = dz @ weight;  dw = dz.T @ hidden;  db = dz.sum(0)  # grads of sum_n coef[n] * logp[n]
//
// Floor. The three products z = h W^T, dh = dz W and dw = dz^T h are 2 N V H
// FLOPs each, 6 N V H in all (8192 x 65536 x 256: 825 GFLOP; 2048 x 151936 x
// 1024: 1.9 TFLOP); nothing else is O(N V H). Compulsory memory traffic is the
// inputs and the float32 gradients, O((N + V) H). The unfused eager code adds
// a (N, V) float32 buffer written once and read about four times (2 GB at the
// first shape); here it never exists.
//
// Schedule. Valid rows (target != ignore_index; ignored rows cost nothing)
// are taken in blocks of R rows; the vocabulary in tiles of VT entries.
// The tiles are grouped into a fixed number of chunks of consecutive tiles;
// threads take chunks dynamically (one slowed by other load on a shared
// machine just does fewer) and call a single-threaded BLAS GEMM per tile.
// dh is summed per chunk, then over chunks in order, so every floating-point
// sum has the same order whatever the thread count or schedule: results are
// bitwise reproducible.
//
//   pass 1, per tile: Z = h_blk W_t^T (R x VT, in L2), z = Z / T + b / T,
//     m = rowmax, E = exp(z - m), s = rowsum(E)  -- the one exp per logit.
//     The target logit is read from the tile it falls in.
//   combine: lse = max_t m_t + log sum_t s_t exp(m_t - max_t m_t).
//   pass 2, per tile: dz = coef / T * (onehot - E exp(m_t - lse)) in place,
//     dh_part[chunk] += dz W_t, dw_t += dz^T h_blk, db_t += colsum(dz).
//
// Without a precomputed lse (the one-sweep loss+gradient), E of a whole row
// block has to wait for the combine step: an R x V float32 buffer is the only
// working memory that scales with V (R is chosen from a memory budget by the
// Python launcher). dw is read and written once per row block, 8 V H bytes
// for 6 R V H FLOPs, so R in the hundreds keeps that traffic well under the
// compute time. With a precomputed lse, or for the forward alone, pass 1 and
// pass 2 fuse per tile and the buffer is one tile per thread.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace grao {

enum class Mode { kForward, kGrad, kGradWithLse };

struct Problem {
  at::Tensor hidden;            // (N, H), any float dtype and strides
  at::Tensor weight;            // (V, H) contiguous
  at::Tensor bias_scaled;       // (V,) float32 = bias / T, or undefined
  at::Tensor targets;           // (N,) int64 contiguous
  at::Tensor coef;              // (N,) float32 contiguous (grad modes)
  at::Tensor lse_in;            // (N,) float32 contiguous (kGradWithLse)
  double temperature = 1.0;
  int64_t ignore_index = -100;
  int64_t block_rows = 256;
  int64_t tile_vocab = 512;
};

struct Result {
  at::Tensor logp, lse, dh, dw, db;
};

// A non-owning float32 matrix view; never requires grad, so it is safe to use
// in GEMMs on worker threads whatever the caller's autograd state.
inline at::Tensor view2d(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// Calls body(chunk, thread) once for every chunk in [0, n_chunks), handing
// chunks out dynamically to the threads of ATen's pool.
template <typename F>
inline void for_each_chunk(int64_t n_chunks, int n_threads, const F& body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t, int64_t) {
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
  const float inv_t = static_cast<float>(1.0 / P.temperature);
  auto f32 = at::TensorOptions().dtype(at::kFloat);

  Result out;
  out.logp = at::zeros({N}, f32);
  out.lse = at::zeros({N}, f32);
  if (grad) {
    out.dh = at::zeros({N, H}, f32);
    out.dw = at::zeros({V, H}, f32);
    out.db = has_bias ? at::zeros({V}, f32) : at::empty({0}, f32);
  }
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
  // One row block's exponentials, tile-major: tile t starts at R * t * VT.
  const bool big_buffer = mode == Mode::kGrad;

  at::Tensor ebuf = big_buffer ? at::empty({R * V}, f32) : at::empty({n_threads, tile_stride}, f32);
  at::Tensor wbuf = w_f32 ? at::Tensor() : at::empty({n_threads, w_stride}, f32);
  at::Tensor dh_part = grad ? at::zeros({n_chunks, R, H}, f32) : at::Tensor();
  std::vector<float> m_t(n_tiles * R), s_t(n_tiles * R), zt(R), lse(R), cs(R);
  std::vector<int64_t> tgt(R);

  float* ebuf_p = ebuf.data_ptr<float>();
  float* wbuf_p = w_f32 ? nullptr : wbuf.data_ptr<float>();
  const float* bias_p = has_bias ? P.bias_scaled.data_ptr<float>() : nullptr;
  float* dw_p = grad ? out.dw.data_ptr<float>() : nullptr;
  float* db_p = grad && has_bias ? out.db.data_ptr<float>() : nullptr;
  float* dh_part_p = grad ? dh_part.data_ptr<float>() : nullptr;

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
    {
      at::Tensor t = P.targets.index_select(0, idx);
      std::copy(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + rb, tgt.begin());
      if (grad) {
        at::Tensor c = P.coef.index_select(0, idx);
        std::copy(c.data_ptr<float>(), c.data_ptr<float>() + rb, cs.begin());
      }
      if (mode == Mode::kGradWithLse) {
        at::Tensor l = P.lse_in.index_select(0, idx);
        std::copy(l.data_ptr<float>(), l.data_ptr<float>() + rb, lse.begin());
      }
    }
    const at::Tensor hb_view = view2d(hb.data_ptr<float>(), rb, H, H);

    // Logits of tile `tile` scaled and biased, max per row, target logit.
    auto logits_tile = [&](int64_t tile, int tid, float* z, at::Tensor& wt) {
      const int64_t v0 = tile * VT, vt = std::min(VT, V - v0);
      wt = weight_tile(v0, vt, tid);
      at::Tensor zv = view2d(z, rb, vt, vt);
      at::mm_out(zv, hb_view, wt.t());
      for (int64_t r = 0; r < rb; ++r) {
        float* row = z + r * vt;
        const float m = scale_bias_max(row, vt, inv_t, bias_p ? bias_p + v0 : nullptr);
        const int64_t local = tgt[r] - v0;
        if (local >= 0 && local < vt) zt[r] = row[local];
        m_t[tile * rb + r] = m;
      }
    };

    // dz tile (already holding coef/T * -softmax) gets the onehot term, then
    // feeds the two gradient GEMMs while it is still in cache.
    auto grad_tile = [&](int64_t tile, int64_t chunk, float* z, const at::Tensor& wt) {
      const int64_t v0 = tile * VT, vt = std::min(VT, V - v0);
      for (int64_t r = 0; r < rb; ++r) {
        const int64_t local = tgt[r] - v0;
        if (local >= 0 && local < vt) z[r * vt + local] += cs[r] * inv_t;
      }
      at::Tensor zv = view2d(z, rb, vt, vt);
      view2d(dh_part_p + chunk * R * H, rb, H, H).addmm_(zv, wt);
      view2d(dw_p + v0 * H, vt, H, H).addmm_(zv.t(), hb_view);
      if (db_p)
        for (int64_t r = 0; r < rb; ++r) add_into(db_p + v0, z + r * vt, vt);
    };

    if (mode == Mode::kGradWithLse) {
      for_each_chunk(n_chunks, n_threads, [&](int64_t c, int tid) {
        float* z = ebuf_p + tid * tile_stride;
        at::Tensor wt;
        const auto [t0, t1] = chunk_tiles(c);
        for (int64_t tile = t0; tile < t1; ++tile) {
          const int64_t vt = std::min(VT, V - tile * VT);
          logits_tile(tile, tid, z, wt);
          for (int64_t r = 0; r < rb; ++r) exp_scale(z + r * vt, vt, lse[r], -cs[r] * inv_t);
          grad_tile(tile, c, z, wt);
        }
      });
    } else {
      // Pass 1.
      for_each_chunk(n_chunks, n_threads, [&](int64_t c, int tid) {
        at::Tensor wt;
        const auto [t0, t1] = chunk_tiles(c);
        for (int64_t tile = t0; tile < t1; ++tile) {
          const int64_t vt = std::min(VT, V - tile * VT);
          float* z = big_buffer ? ebuf_p + rb * tile * VT : ebuf_p + tid * tile_stride;
          logits_tile(tile, tid, z, wt);
          for (int64_t r = 0; r < rb; ++r)
            s_t[tile * rb + r] = exp_sum(z + r * vt, vt, m_t[tile * rb + r], big_buffer);
        }
      });
      // Combine the per-tile (max, sum) pairs in double.
      for (int64_t r = 0; r < rb; ++r) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n_tiles; ++t) mx = std::max(mx, m_t[t * rb + r]);
        double s = 0.0;
        for (int64_t t = 0; t < n_tiles; ++t) s += double(s_t[t * rb + r]) * std::exp(double(m_t[t * rb + r]) - mx);
        lse[r] = static_cast<float>(double(mx) + std::log(s));
      }
      if (mode == Mode::kGrad) {
        // Pass 2.
        for_each_chunk(n_chunks, n_threads, [&](int64_t c, int tid) {
          const auto [t0, t1] = chunk_tiles(c);
          for (int64_t tile = t0; tile < t1; ++tile) {
            const int64_t v0 = tile * VT, vt = std::min(VT, V - v0);
            float* z = ebuf_p + rb * v0;
            for (int64_t r = 0; r < rb; ++r)
              scale_inplace(z + r * vt, vt, -cs[r] * inv_t * std::exp(m_t[tile * rb + r] - lse[r]));
            grad_tile(tile, c, z, weight_tile(v0, vt, tid));
          }
        });
      }
    }

    // Scatter this block's results back to its rows.
    at::Tensor lse_blk = at::from_blob(lse.data(), {rb}, f32).clone();
    at::Tensor zt_blk = at::from_blob(zt.data(), {rb}, f32);
    out.logp.index_copy_(0, idx, zt_blk - lse_blk);
    out.lse.index_copy_(0, idx, lse_blk);
    if (grad) {
      // Chunk partials summed in chunk order into the first.
      for (int64_t c = 1; c < n_chunks; ++c) add_into(dh_part_p, dh_part_p + c * R * H, rb * H);
      out.dh.index_copy_(0, idx, dh_part.select(0, 0).narrow(0, 0, rb));
      dh_part.zero_();
    }
  }
  if (mode == Mode::kGradWithLse) out.lse = P.lse_in;
  return out;
}

}  // namespace grao
