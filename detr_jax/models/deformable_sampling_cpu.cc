// The multi-scale deformable sampling on the CPU, forward and backward, as an XLA FFI kernel: the
// official CUDA kernel's idea (`models/ops/src/cuda/ms_deform_im2col_cuda.cuh`: each query reads its
// bilinear corners and the backward adds straight into the value gradient) for XLA:CPU, where the
// pure-JAX version materialises every scatter-add's update rows. The arithmetic is that of
// `deformable_attention._sampling` and `_sampling_backward` (pixel = location * size - 0.5, corners
// outside the map read 0); `sampling_kernel.py` registers and calls it.
//
// Layouts (float32, row-major): value [B, S, M, D]; locations [B, Q, M, L, P, 2] (x, y) normalised;
// weights [B, Q, M, L, P]; output and its cotangent [B, Q, M, D]. Attributes: the L level heights and
// widths. Work is split over the B * M (image, head) pairs, which write disjoint rows of the value
// gradient, so the threads never add into the same memory.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Dims {
  int64_t batch, total, heads, channels, queries, levels, points;
};

// Reads the sizes of the arrays into *d, or returns an error naming the inconsistent one
// (deformable_sampling checks the same in Python; this guards direct calls).
ffi::Error ReadDims(const ffi::Buffer<ffi::F32>& value, const ffi::Buffer<ffi::F32>& locations,
                    const ffi::Buffer<ffi::F32>& weights, ffi::Span<const int64_t> heights,
                    ffi::Span<const int64_t> widths, Dims* d) {
  auto v = value.dimensions();
  auto l = locations.dimensions();
  auto w = weights.dimensions();
  if (v.size() != 4 || l.size() != 6 || w.size() != 5 || l[5] != 2) {
    return ffi::Error::InvalidArgument("deformable sampling: expected value [B, S, M, D], locations "
                                       "[B, Q, M, L, P, 2] and weights [B, Q, M, L, P]");
  }
  *d = Dims{v[0], v[1], v[2], v[3], l[1], l[3], l[4]};
  int64_t total = 0;
  for (size_t i = 0; i < heights.size(); ++i) total += heights[i] * widths[i];
  if (l[0] != d->batch || l[2] != d->heads || static_cast<int64_t>(heights.size()) != d->levels ||
      widths.size() != heights.size() || total != d->total) {
    return ffi::Error::InvalidArgument("deformable sampling: locations, value and the level sizes disagree");
  }
  for (int i = 0; i < 5; ++i) {
    if (w[i] != l[i]) return ffi::Error::InvalidArgument("deformable sampling: weights and locations disagree");
  }
  return ffi::Error::Success();
}

std::vector<int64_t> LevelStarts(ffi::Span<const int64_t> heights, ffi::Span<const int64_t> widths) {
  std::vector<int64_t> starts(heights.size(), 0);
  for (size_t l = 1; l < heights.size(); ++l) starts[l] = starts[l - 1] + heights[l - 1] * widths[l - 1];
  return starts;
}

// work(0) .. work(units - 1) on this thread and on XLA's intra-op thread pool, which keeps its threads
// (and so their thread_local buffers) from call to call. Whoever is free takes the next unit; the
// caller works too and returns once every unit is done, so it never waits on a task that has not
// started: a task that starts later finds no unit left and touches nothing but `progress`.
template <typename F>
void ParallelOverUnits(ffi::ThreadPool& pool, int64_t units, F&& work) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  auto take_units = [progress, units, &work] {
    for (int64_t unit; (unit = progress->next.fetch_add(1)) < units;) {
      work(unit);
      progress->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), units) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(take_units)(take_units));
  take_units();
  while (progress->done.load() < units) std::this_thread::yield();
}

// Calls visit(pixel, bilinear weight, its derivatives by the fractions fx and fy) for each of the four
// corners around (x, y) that lies inside the h x w map; pixel = row * w + column.
template <typename F>
inline void ForEachCorner(float x, float y, int64_t h, int64_t w, F&& visit) {
  const float px = x * static_cast<float>(w) - 0.5f;
  const float py = y * static_cast<float>(h) - 0.5f;
  const float fx0 = std::floor(px), fy0 = std::floor(py);
  const float fx = px - fx0, fy = py - fy0;
  const int64_t x0 = static_cast<int64_t>(fx0), y0 = static_cast<int64_t>(fy0);
  for (int dy = 0; dy < 2; ++dy) {
    const int64_t yy = y0 + dy;
    if (yy < 0 || yy >= h) continue;
    const float wy = dy ? fy : 1.0f - fy;
    for (int dx = 0; dx < 2; ++dx) {
      const int64_t xx = x0 + dx;
      if (xx < 0 || xx >= w) continue;
      const float wx = dx ? fx : 1.0f - fx;
      visit(yy * w + xx, wx * wy, (dx ? 1.0f : -1.0f) * wy, (dy ? 1.0f : -1.0f) * wx);
    }
  }
}

// Head m of image b, value[b, :, m, :], copied into `rows` as [S, D] contiguous: the random reads of one
// (image, head) then stay within S * D floats instead of spanning the whole [S, M, D] image.
void CopyHead(const float* value, const Dims& d, int64_t b, int64_t m, std::vector<float>& rows) {
  rows.resize(d.total * d.channels);
  for (int64_t s = 0; s < d.total; ++s) {
    const float* source = value + ((b * d.total + s) * d.heads + m) * d.channels;
    std::copy(source, source + d.channels, rows.data() + s * d.channels);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::F32> locations, ffi::Buffer<ffi::F32> weights,
                   ffi::Span<const int64_t> heights, ffi::Span<const int64_t> widths,
                   ffi::ResultBuffer<ffi::F32> out) {
  Dims d;
  if (ffi::Error error = ReadDims(value, locations, weights, heights, widths, &d); error.failure()) return error;
  const std::vector<int64_t> starts = LevelStarts(heights, widths);
  const float* loc = locations.typed_data();
  const float* wt = weights.typed_data();
  float* o = out->typed_data();
  const int64_t C = d.channels;
  ParallelOverUnits(pool, d.batch * d.heads, [&](int64_t unit) {
    const int64_t b = unit / d.heads, m = unit % d.heads;
    thread_local std::vector<float> rows;
    CopyHead(value.typed_data(), d, b, m, rows);
    for (int64_t q = 0; q < d.queries; ++q) {
      const int64_t bqm = (b * d.queries + q) * d.heads + m;
      float* acc = o + bqm * C;
      std::fill(acc, acc + C, 0.0f);
      for (int64_t l = 0; l < d.levels; ++l) {
        const float* level_rows = rows.data() + starts[l] * C;
        for (int64_t p = 0; p < d.points; ++p) {
          const int64_t lp = (bqm * d.levels + l) * d.points + p;
          const float weight = wt[lp];
          ForEachCorner(loc[2 * lp], loc[2 * lp + 1], heights[l], widths[l],
                        [&](int64_t pixel, float bilinear, float, float) {
                          const float c = bilinear * weight;
                          const float* row = level_rows + pixel * C;
                          for (int64_t k = 0; k < C; ++k) acc[k] += c * row[k];
                        });
        }
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::F32> locations, ffi::Buffer<ffi::F32> weights,
                    ffi::Buffer<ffi::F32> cotangent, ffi::Span<const int64_t> heights,
                    ffi::Span<const int64_t> widths, ffi::ResultBuffer<ffi::F32> value_grad,
                    ffi::ResultBuffer<ffi::F32> location_grad, ffi::ResultBuffer<ffi::F32> weight_grad) {
  Dims d;
  if (ffi::Error error = ReadDims(value, locations, weights, heights, widths, &d); error.failure()) return error;
  const std::vector<int64_t> starts = LevelStarts(heights, widths);
  const float* loc = locations.typed_data();
  const float* wt = weights.typed_data();
  const float* g = cotangent.typed_data();
  float* gv = value_grad->typed_data();
  float* gl = location_grad->typed_data();
  float* gw = weight_grad->typed_data();
  const int64_t C = d.channels;
  ParallelOverUnits(pool, d.batch * d.heads, [&](int64_t unit) {
    const int64_t b = unit / d.heads, m = unit % d.heads;
    thread_local std::vector<float> rows, row_grads;
    CopyHead(value.typed_data(), d, b, m, rows);
    row_grads.assign(d.total * C, 0.0f);
    for (int64_t q = 0; q < d.queries; ++q) {
      const int64_t bqm = (b * d.queries + q) * d.heads + m;
      const float* grad = g + bqm * C;
      for (int64_t l = 0; l < d.levels; ++l) {
        const float* level_rows = rows.data() + starts[l] * C;
        float* level_grads = row_grads.data() + starts[l] * C;
        const float h = static_cast<float>(heights[l]), w = static_cast<float>(widths[l]);
        for (int64_t p = 0; p < d.points; ++p) {
          const int64_t lp = (bqm * d.levels + l) * d.points + p;
          const float weight = wt[lp];
          float grad_weight = 0.0f, grad_fx = 0.0f, grad_fy = 0.0f;
          ForEachCorner(loc[2 * lp], loc[2 * lp + 1], heights[l], widths[l],
                        [&](int64_t pixel, float bilinear, float dfx, float dfy) {
                          const float* read = level_rows + pixel * C;
                          float* write = level_grads + pixel * C;
                          const float c = bilinear * weight;
                          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                          for (int64_t k = 0; k < C; ++k) {
                            dot += read[k] * grad[k];
                            write[k] += c * grad[k];
                          }
                          grad_weight += bilinear * dot;
                          grad_fx += dfx * dot;
                          grad_fy += dfy * dot;
                        });
          gw[lp] = grad_weight;
          gl[2 * lp] = grad_fx * weight * w;
          gl[2 * lp + 1] = grad_fy * weight * h;
        }
      }
    }
    for (int64_t s = 0; s < d.total; ++s) {
      const float* source = row_grads.data() + s * C;
      std::copy(source, source + C, gv + ((b * d.total + s) * d.heads + m) * C);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeformableSamplingForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("heights")
                                  .Attr<ffi::Span<const int64_t>>("widths")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeformableSamplingBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("heights")
                                  .Attr<ffi::Span<const int64_t>>("widths")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
