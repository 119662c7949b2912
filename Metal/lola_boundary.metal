// LoLA's block boundary in one launch (the ops it replaces: mlx_linear.sparse.boundary, the oracle):
// the cache's SLOTS keys and the block's C are ranked by their self-recall error against the state,
// || phi(k) S / phi(k) z - v ||^2 summed over the query heads of the KV head (-inf where not
// eligible: a sink; past the horizon, but for the LONG best ranked there; with unique[0] > 0, a
// candidate with a better-ranked copy: key and value cosines above it, one of the two a block key);
// the SLOTS best ranked (the larger error first, ties to the earlier) form the new cache in their
// order, the eligible among them kept; every other candidate enters the state, decayed since it
// left the window: S' = 2^... S + sum w_c phi(k_c)^T [v_c, 1] (the sinks only with SINK_STATE).
// One threadgroup per (batch, KV head); launch: grid (32, NSG, B * HKV), threadgroup (32, NSG, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint n = threadgroup_position_in_grid.z;  // b * HKV + KV head
uint tid = sg * 32 + lane;
constexpr int NC = SLOTS + C;  // the candidates: the cache, then the block
constexpr int D1 = Dk + 1;
float start_ = start[0];

threadgroup float score[NC], weight[NC], key_norm[NC], value_norm[NC];
threadgroup int place[NC];  // the candidate's slot in the new cache, or -1
threadgroup bool eligible[NC], kept[NC], leaves[NC];  // leaves: a copy (1b), or past the horizon beyond LONG (1c)

// 1. Each candidate's recall error.
for (int c = sg; c < NC; c += NSG) {
  float p = c < SLOTS ? cache_positions[n * SLOTS + c] : block_positions[n * C + c - SLOTS];
  bool ok = p >= S && (HORIZON == 0 || LONG > 0 || p >= start_ - HORIZON);  // past it: LONG at most, below
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
  auto key = c < SLOTS ? cache_keys + (size_t(n) * SLOTS + c) * Dk : block_keys + (size_t(n) * C + c - SLOTS) * Dk;
  float key_part = 0.0f, value_part = 0.0f;
  for (int j = lane; j < Dk; j += 32) key_part += key[j] * key[j], value_part += value[j] * value[j];
  key_part = simd_sum(key_part), value_part = simd_sum(value_part);
  if (lane == 0) {
    score[c] = ok ? error : -INFINITY;
    eligible[c] = ok;
    weight[c] = SINK_STATE || p >= S ? metal::exp(log_decay[0] * (start_ - C - p)) : 0.0f;  // the sinks: the window reads them
    key_norm[c] = key_part, value_norm[c] = value_part;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 1b. Copies (sparse.copies): a candidate whose key and value are both within the cosine of a better-ranked one's.
float unique_ = unique[0];
for (int c = sg; c < NC; c += NSG) {
  bool copy = false;
  auto key = c < SLOTS ? cache_keys + (size_t(n) * SLOTS + c) * Dk : block_keys + (size_t(n) * C + c - SLOTS) * Dk;
  auto value = c < SLOTS ? cache_values + (size_t(n) * SLOTS + c) * Dk : block_values + (size_t(n) * C + c - SLOTS) * Dk;
  for (int o = c < SLOTS ? SLOTS : 0; unique_ > 0 && o < NC && !copy; ++o) {  // the cache holds no copies of its own
    if (!(score[o] > score[c] || (score[o] == score[c] && o < c))) continue;
    auto other_key = o < SLOTS ? cache_keys + (size_t(n) * SLOTS + o) * Dk : block_keys + (size_t(n) * C + o - SLOTS) * Dk;
    auto other_value = o < SLOTS ? cache_values + (size_t(n) * SLOTS + o) * Dk : block_values + (size_t(n) * C + o - SLOTS) * Dk;
    float key_dot = 0.0f, value_dot = 0.0f;
    for (int j = lane; j < Dk; j += 32) key_dot += key[j] * other_key[j], value_dot += value[j] * other_value[j];
    key_dot = simd_sum(key_dot), value_dot = simd_sum(value_dot);
    float bound = unique_ * unique_;
    copy = key_dot > 0 && key_dot * key_dot > bound * key_norm[c] * key_norm[o]
              && value_dot > 0 && value_dot * value_dot > bound * value_norm[c] * value_norm[o];
  }
  if (lane == 0) leaves[c] = copy;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int c = tid; c < NC; c += 32 * NSG) {
  if (leaves[c]) score[c] = -INFINITY, eligible[c] = false;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 1c. Past the horizon, only the LONG best ranked (those still eligible) stay eligible.
for (int c = tid; HORIZON > 0 && LONG > 0 && c < NC; c += 32 * NSG) {
  float p = c < SLOTS ? cache_positions[n * SLOTS + c] : block_positions[n * C + c - SLOTS];
  int rank = 0;
  for (int o = 0; o < NC; ++o) {
    float q = o < SLOTS ? cache_positions[n * SLOTS + o] : block_positions[n * C + o - SLOTS];
    rank += q < start_ - HORIZON && (score[o] > score[c] || (score[o] == score[c] && o < c));
  }
  leaves[c] = p < start_ - HORIZON && rank >= LONG;  // it leaves
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int c = tid; HORIZON > 0 && LONG > 0 && c < NC; c += 32 * NSG) {
  if (leaves[c]) score[c] = -INFINITY, eligible[c] = false;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. Ranks: the SLOTS first (larger error, then earlier) stay; their order is the candidates'.
for (int c = tid; c < NC; c += 32 * NSG) {
  int rank = 0;
  for (int o = 0; o < NC; ++o) rank += score[o] > score[c] || (score[o] == score[c] && o < c);
  kept[c] = rank < SLOTS;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int c = tid; c < NC; c += 32 * NSG) {  // the empty slots first, then the cache in the order of positions
  int before = 0, empty = 0;
  for (int o = 0; o < NC; ++o) {
    empty += kept[o] && !eligible[o];
    before += o < c && kept[o] && eligible[o] == eligible[c];
  }
  place[c] = kept[c] ? before + (eligible[c] ? empty : 0) : -1;
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
