// One decode token of a LoLA layer between two block boundaries, from its projected q, k, v to the
// output, in one launch (the ops it replaces: mlx_linear.sparse.step, the oracle):
//   features phi(x) = [softmax(x W), softmax(-x W)] per query head (of the rotated x with AFTER_ROPE);
//   the state's terms phi(q) [S, z] decayed by 2^(r log_decay); one softmax over the ring buffer
//   (sinks first, scored from the sinks' horizon), the pending block's keys (c <= r, past the sinks,
//   scored from C + r) and the cache's (slot j at position j SPAN / SLOTS, read from 2C + SPAN), under
//   LoLCATs' shared denominator:
//   y = (w sum e^(s - M) v + e^(top - M) num) / (w sum e^(s - M) + e^(top - M) den), top the ring's max.
// RoPE: `rot` at the token's position, `sink_rot` at the sinks' row, `table` at fixed positions
// (rows 0 .. 2C + SPAN at least).
// Writes the ring buffer and the block buffer (raw key, value, key features at C + r) anew.
// One threadgroup per (batch, KV head); launch: grid (32, NSG, B * HKV), threadgroup (32, NSG, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint n = threadgroup_position_in_grid.z;  // b * HKV + KV head
constexpr int T = N + C + SLOTS;  // the keys of the softmax: ring, pending block, cache
constexpr int W2 = 2 * C;  // the block buffer's rows
int o = offset[0];
int r_ = o % C;

threadgroup float k_rot[Dk], v_row[Dk], k_in[Dk];
threadgroup float q_rows[R * 4 * Dk], q_in[R * Dk], q_feat[R * F], k_feat[R * F];
threadgroup float linear[R * (Dk + 1)], scores[R * T], own[R], totals[R];

// 1. The token's key and value; the query's rotations (step, sinks' horizon, C + r, 2C + SPAN), scaled.
auto k_ = k + size_t(n) * Dk;
auto v_ = v + size_t(n) * Dk;
if (sg == 0) {
  for (int i = lane; i < Dk; i += 32) {
    k_rot[i] = rotated<Dk, TRADITIONAL>(k_, rot, 0, i);
    k_in[i] = AFTER_ROPE ? k_rot[i] : static_cast<float>(k_[i]);
    v_row[i] = static_cast<float>(v_[i]);
  }
}
for (int r = sg; r < R; r += NSG) {
  auto q_ = q + (size_t(n) * R + r) * Dk;
  int rows[4] = {0, 0, C + r_, 2 * C + SPAN};  // the first two: rot, sink_rot
  for (int i = lane; i < Dk; i += 32) {
    for (int p = 0; p < 4; ++p) {
      auto at = p == 0 ? rot : p == 1 ? sink_rot : table + rows[p] * 2 * Dk;
      q_rows[(r * 4 + p) * Dk + i] = rotated<Dk, TRADITIONAL>(q_, at, 0, i) * scale[0];
    }
    q_in[r * Dk + i] = AFTER_ROPE ? rotated<Dk, TRADITIONAL>(q_, rot, 0, i) : static_cast<float>(q_[i]);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. Features of q and k per query head (Hedgehog: both halves normalised apart).
for (int r = sg; r < R; r += NSG) {
  size_t head = (n % HKV) * R + r;
  for (int which = 0; which < 2; ++which) {
    auto x = which == 0 ? q_in + r * Dk : k_in;
    auto map = (which == 0 ? q_map : k_map) + head * Dk * FH;
    auto out = (which == 0 ? q_feat : k_feat) + r * F;
    for (int j = lane; j < FH; j += 32) {
      float y = 0.0f;
      for (int i = 0; i < Dk; ++i) y += x[i] * static_cast<float>(map[i * FH + j]);
      out[j] = y;
      out[FH + j] = -y;
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);
    softmax_row<FH>(out, out, lane);
    softmax_row<FH>(out + FH, out + FH, lane);
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. The state's terms; the block buffer copied with the token's row at C + r.
for (int j = sg; j < Dk + 1; j += NSG) {
  for (int r = 0; r < R; ++r) {
    auto S_ = state + ((size_t(n) * R + r) * F) * (Dk + 1);
    float part = 0.0f;
    for (int f = lane; f < F; f += 32) part += q_feat[r * F + f] * S_[f * (Dk + 1) + j];
    part = simd_sum(part);
    if (lane == 0) linear[r * (Dk + 1) + j] = part * metal::exp(log_decay[0] * r_);
  }
}
for (int row = sg; row < W2; row += NSG) {
  for (int i = lane; i < Dk; i += 32) {
    size_t at = (size_t(n) * W2 + row) * Dk + i;
    block_keys_out[at] = row == C + r_ ? static_cast<float>(k_[i]) : block_keys[at];
    block_values_out[at] = row == C + r_ ? v_row[i] : block_values[at];
  }
  for (int r = 0; r < R; ++r) {
    for (int f = lane; f < F; f += 32) {
      size_t at = ((size_t(n) * R + r) * W2 + row) * F + f;
      block_features_out[at] = row == C + r_ ? k_feat[r * F + f] : block_features[at];
    }
  }
}

// 4. Scores: the ring (its copy written with the token's key), the pending block, the cache.
for (int m = sg; m < T; m += NSG) {
  int row;  // which rotation of the query; -1: not visible
  float key[(Dk + 31) / 32];
  if (m < N) {
    row = m < S ? 1 : 0;
    for (int u = 0, i = lane; i < Dk; ++u, i += 32) {
      size_t at = (size_t(n) * N + m) * Dk + i;
      key[u] = m == slot[0] ? k_rot[i] : static_cast<float>(keys[at]);
      keys_out[at] = key[u];
    }
  } else if (m < N + C) {
    int c = m - N;
    row = c <= r_ && o - r_ - C + c >= S ? 2 : -1;
    auto raw = block_keys + (size_t(n) * W2 + c) * Dk;
    for (int u = 0, i = lane; i < Dk; ++u, i += 32) key[u] = rotated<Dk, TRADITIONAL>(raw, table + c * 2 * Dk, 0, i);
  } else {
    int j = m - N - C;
    row = cache_positions[size_t(n) * SLOTS + j] >= 0 ? 3 : -1;
    auto raw = cache_keys + (size_t(n) * SLOTS + j) * Dk;
    for (int u = 0, i = lane; i < Dk; ++u, i += 32) key[u] = rotated<Dk, TRADITIONAL>(raw, table + (j * SPAN / SLOTS) * 2 * Dk, 0, i);
  }
  for (int r = 0; r < R; ++r) {
    float part = 0.0f;
    if (row >= 0) {
      for (int u = 0, i = lane; i < Dk; ++u, i += 32) part += q_rows[(r * 4 + row) * Dk + i] * key[u];
    }
    part = simd_sum(part);
    if (lane == 0) scores[r * T + m] = row >= 0 ? part : -INFINITY;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 5. Per query head: the largest score of all (M) and of the ring (top); weights e^(s - M).
for (int r = sg; r < R; r += NSG) {
  float all = -INFINITY, ring = -INFINITY;
  for (int m = lane; m < T; m += 32) {
    all = max(all, scores[r * T + m]);
    if (m < N) ring = max(ring, scores[r * T + m]);
  }
  all = simd_max(all);
  ring = simd_max(ring);
  float total = 0.0f;
  for (int m = lane; m < T; m += 32) {
    float e = metal::exp(scores[r * T + m] - all);
    scores[r * T + m] = e;
    total += e;
  }
  total = simd_sum(total);
  if (lane == 0) {
    own[r] = metal::exp(ring - all);
    totals[r] = total;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 6. The exact keys' values under the weights, and the output; the ring's values copied.
for (int j = sg; j < Dk; j += NSG) {
  float parts[R];
  for (int r = 0; r < R; ++r) parts[r] = 0.0f;
  for (int m = lane; m < T; m += 32) {
    float x;
    if (m < N) {
      size_t at = (size_t(n) * N + m) * Dk + j;
      x = m == slot[0] ? v_row[j] : static_cast<float>(values[at]);
      values_out[at] = x;
    } else if (m < N + C) {
      x = block_values[(size_t(n) * W2 + m - N) * Dk + j];
    } else {
      x = cache_values[(size_t(n) * SLOTS + m - N - C) * Dk + j];
    }
    for (int r = 0; r < R; ++r) parts[r] += scores[r * T + m] * x;
  }
  for (int r = 0; r < R; ++r) {
    float exact = simd_sum(parts[r]);
    if (lane == 0) {
      size_t head = (n % HKV) * R + r;
      float w = window_weight[head];
      float num = linear[r * (Dk + 1) + j], den = linear[r * (Dk + 1) + Dk];
      y[(size_t(n) * R + r) * Dk + j] = (w * exact + own[r] * num) / (w * totals[r] + own[r] * den);
    }
  }
}
