// One decode token of a Liger-GLA layer, from its projected q, k, v to the mixed output, in one
// launch (the ops it replaces: mlx_linear.methods.base.LinearMethod.step, the oracle):
//   phi(x) = softmax(x),  log a = log_sigmoid(k) / gate_normalizer,  S = diag(a) S + phi(k)^T [v, 1?]
//   linear = phi(q) S (divided by its z column with NORMALIZE),  window = softmax over the ring
//   buffer (sinks first; the token's key in `slot`), y = mix * linear + (1 - mix) * window.
// RoPE comes as multipliers (mlx_linear/rotary.py): rotated x = x * A + partner(x) * B, `rot` at
// the token's position, `sink_rot` at the sinks' horizon (P = 2 with sinks: it scores the first S keys).
// One threadgroup per (batch, KV head): NSG simdgroups; lanes stride the head dims, simdgroups
// the state's columns, the query heads and the keys. Also writes the new state and ring buffer.
// Launch: grid (32, NSG, B * HKV), threadgroup (32, NSG, 1).
uint lane = thread_index_in_simdgroup;
uint sg = simdgroup_index_in_threadgroup;
uint n = threadgroup_position_in_grid.z;  // b * HKV + KV head

threadgroup float phi_k[Dk], decay[Dk], k_rot[Dk], v_row[Dv];
threadgroup float phi_q[R * Dk], q_rot[R * P * Dk];
threadgroup float linear[R * Dvs], scores[R * N];

// 1. The token's key (features, gates, rotation) and value; each query head's features and rotations.
auto k_ = k + size_t(n) * Dk;
auto kf_ = kf + size_t(n) * Dk;
auto v_ = v + size_t(n) * Dv;
if (sg == 0) {
  softmax_row<Dk>(kf_, phi_k, lane);
  for (int i = lane; i < Dk; i += 32) {
    decay[i] = metal::exp(log_sigmoid(static_cast<float>(k_[i])) * inv_gate_normalizer[0]);
    k_rot[i] = rotated<Dk, TRADITIONAL>(k_, rot, 0, i);
  }
  for (int j = lane; j < Dv; j += 32) v_row[j] = static_cast<float>(v_[j]);
}
for (int r = sg; r < R; r += NSG) {
  size_t h = size_t(n) * R + r;  // the query head's row: b * H + KV head * R + r
  softmax_row<Dk>(qf + h * Dk, phi_q + r * Dk, lane);
  for (int p = 0; p < P; ++p) {
    for (int i = lane; i < Dk; i += 32) q_rot[(r * P + p) * Dk + i] = rotated<Dk, TRADITIONAL>(q + h * Dk, p == 0 ? rot : sink_rot, 0, i) * scale[0];
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 2. The state: decayed, the token written, read by every query head of the group.
for (int j = sg; j < Dvs; j += NSG) {
  float v_j = j < Dv ? v_row[j] : 1.0f;  // the ones column carries z
  float column[(Dk + 31) / 32];
  for (int u = 0, i = lane; i < Dk; ++u, i += 32) {
    size_t at = (size_t(n) * Dk + i) * Dvs + j;
    column[u] = decay[i] * state[at] + phi_k[i] * v_j;
    state_out[at] = column[u];
  }
  for (int r = 0; r < R; ++r) {
    float part = 0.0f;
    for (int u = 0, i = lane; i < Dk; ++u, i += 32) part += phi_q[r * Dk + i] * column[u];
    part = simd_sum(part);
    if (lane == 0) linear[r * Dvs + j] = part;
  }
}

// 3. The window's scores; the ring buffer copied with the token's key in its slot.
for (int m = sg; m < N; m += NSG) {
  auto key = keys + (size_t(n) * N + m) * Dk;
  int row = m < S ? 1 : 0;
  float parts[R];
  for (int r = 0; r < R; ++r) parts[r] = 0.0f;
  for (int i = lane; i < Dk; i += 32) {
    float x = m == slot[0] ? k_rot[i] : static_cast<float>(key[i]);
    keys_out[(size_t(n) * N + m) * Dk + i] = x;
    for (int r = 0; r < R; ++r) parts[r] += q_rot[(r * P + row) * Dk + i] * x;
  }
  for (int r = 0; r < R; ++r) {
    float total = simd_sum(parts[r]);
    if (lane == 0) scores[r * N + m] = total;
  }
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 4. Softmax weights per query head.
for (int r = sg; r < R; r += NSG) {
  float top = -INFINITY;
  for (int m = lane; m < N; m += 32) top = max(top, scores[r * N + m]);
  top = simd_max(top);
  float total = 0.0f;
  for (int m = lane; m < N; m += 32) total += metal::exp(scores[r * N + m] - top);
  total = simd_sum(total);
  for (int m = lane; m < N; m += 32) scores[r * N + m] = metal::exp(scores[r * N + m] - top) / total;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

// 5. The window's output, mixed with the linear branch; the values copied with the token's.
for (int j = sg; j < Dv; j += NSG) {
  float parts[R];
  for (int r = 0; r < R; ++r) parts[r] = 0.0f;
  for (int m = lane; m < N; m += 32) {
    size_t at = (size_t(n) * N + m) * Dv + j;
    float x = m == slot[0] ? v_row[j] : static_cast<float>(values[at]);
    values_out[at] = x;
    for (int r = 0; r < R; ++r) parts[r] += scores[r * N + m] * x;
  }
  for (int r = 0; r < R; ++r) {
    float window = simd_sum(parts[r]);
    if (lane == 0) {
      size_t h = size_t(n) * R + r;
      float lin = NORMALIZE ? linear[r * Dvs + j] / (linear[r * Dvs + Dv] + eps[0]) : linear[r * Dvs + j];
      float w = mix[(n % HKV) * R + r];  // per query head
      y[h * Dv + j] = w * lin + (1.0f - w) * window;
    }
  }
}
