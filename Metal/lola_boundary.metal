// LoLA's block boundary in one launch (the ops it replaces: mlx_linear.sparse.boundary, the oracle):
// the cache's SLOTS keys and the block's C are ranked by their self-recall error against the state,
// || phi(k) S / phi(k) z - v ||^2 summed over the query heads of the KV head (-inf where not
// eligible: a sink, or past the horizon); the SLOTS best ranked (the larger error first, ties to the
// earlier) form the new cache in their order, the eligible among them kept; every other candidate
// enters the state, decayed since it left the window: S' = 2^... S + sum w_c phi(k_c)^T [v_c, 1].
// One threadgroup per (batch, KV head); launch: grid (32, NSG, B * HKV), threadgroup (32, NSG, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint n = threadgroup_position_in_grid.z;  // b * HKV + KV head
uint tid = sg * 32 + lane;
constexpr int NC = SLOTS + C;  // the candidates: the cache, then the block
constexpr int D1 = Dk + 1;
float start_ = start[0];

threadgroup float score[NC], weight[NC];
threadgroup int place[NC];  // the candidate's slot in the new cache, or -1
threadgroup bool eligible[NC], kept[NC];

// 1. Each candidate's recall error.
for (int c = sg; c < NC; c += NSG) {
  float p = c < SLOTS ? cache_positions[n * SLOTS + c] : block_positions[n * C + c - SLOTS];
  bool ok = p >= S && (HORIZON == 0 || p >= start_ - HORIZON);
  auto value = c < SLOTS ? cache_values + (size_t(n) * SLOTS + c) * Dk : block_values + (size_t(n) * C + c - SLOTS) * Dk;
  float error = 0.0f;
  for (int r = 0; r < R; ++r) {
    size_t head = size_t(n) * R + r;
    auto feature = c < SLOTS ? cache_features + (head * SLOTS + c) * F : block_features + (head * C + c - SLOTS) * F;
    auto S_ = state + head * F * D1;
    float recalled[(D1 + 31) / 32] = {};
    for (int u = 0, j = lane; j < D1; ++u, j += 32) {
      float total = 0.0f;
      for (int f = 0; f < F; ++f) total += feature[f] * S_[f * D1 + j];
      recalled[u] = total;
    }
    float den = simd_broadcast(recalled[Dk / 32], Dk % 32);
    float part = 0.0f;
    for (int u = 0, j = lane; j < Dk; ++u, j += 32) {
      float guess = den > 0 ? recalled[u] / den : 0.0f;
      part += (guess - value[j]) * (guess - value[j]);
    }
    error += simd_sum(part);
  }
  if (lane == 0) {
    score[c] = ok ? error : -INFINITY;
    eligible[c] = ok;
    weight[c] = metal::exp(log_decay[0] * (start_ - C - p));
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. Ranks: the SLOTS first (larger error, then earlier) stay; their order is the candidates'.
for (int c = tid; c < NC; c += 32 * NSG) {
  int rank = 0;
  for (int o = 0; o < NC; ++o) rank += score[o] > score[c] || (score[o] == score[c] && o < c);
  kept[c] = rank < SLOTS;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int c = tid; c < NC; c += 32 * NSG) {
  int before = 0;
  for (int o = 0; o < c; ++o) before += kept[o];
  place[c] = kept[c] ? before : -1;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 3. The new cache: the staying candidates, zeros (position -1) where one was not eligible.
for (int c = sg; c < NC; c += NSG) {
  if (place[c] < 0) continue;
  size_t to = size_t(n) * SLOTS + place[c];
  bool keep = eligible[c];
  auto key = c < SLOTS ? cache_keys + (size_t(n) * SLOTS + c) * Dk : block_keys + (size_t(n) * C + c - SLOTS) * Dk;
  auto value = c < SLOTS ? cache_values + (size_t(n) * SLOTS + c) * Dk : block_values + (size_t(n) * C + c - SLOTS) * Dk;
  for (int i = lane; i < Dk; i += 32) {
    keys_out[to * Dk + i] = keep ? key[i] : 0.0f;
    values_out[to * Dk + i] = keep ? value[i] : 0.0f;
  }
  for (int r = 0; r < R; ++r) {
    size_t head = size_t(n) * R + r;
    auto feature = c < SLOTS ? cache_features + (head * SLOTS + c) * F : block_features + (head * C + c - SLOTS) * F;
    for (int f = lane; f < F; f += 32) features_out[(head * SLOTS + place[c]) * F + f] = keep ? feature[f] : 0.0f;
  }
  float p = c < SLOTS ? cache_positions[n * SLOTS + c] : block_positions[n * C + c - SLOTS];
  if (lane == 0) positions_out[to] = keep ? p : -1.0f;
}

// 4. The state: decayed over the block, plus every candidate that did not stay (cached ones weigh 0).
float decay = metal::exp(log_decay[0] * C);
for (int e = tid; e < R * F * D1; e += 32 * NSG) {
  int r = e / (F * D1), f = (e / D1) % F, j = e % D1;
  size_t head = size_t(n) * R + r;
  float total = decay * state[head * F * D1 + f * D1 + j];
  for (int c = 0; c < NC; ++c) {
    if (kept[c] && eligible[c]) continue;  // in the cache
    float feature = c < SLOTS ? cache_features[(head * SLOTS + c) * F + f] : block_features[(head * C + c - SLOTS) * F + f];
    float value = j == Dk ? 1.0f : (c < SLOTS ? cache_values[(size_t(n) * SLOTS + c) * Dk + j] : block_values[(size_t(n) * C + c - SLOTS) * Dk + j]);
    total += weight[c] * feature * value;
  }
  state_out[head * F * D1 + f * D1 + j] = total;
}
