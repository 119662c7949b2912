// Gated linear attention, recurrent form, with the time loop in the kernel (decode and prefill):
//   S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,    o_{t,r} = q_{t,r} S_t
// One simdgroup owns value column j of one state (b, state head); lane l keeps the float32
// state rows i = l + 32 u. The R query heads of a GQA group read the same state.
// Launch: grid (32, Dv, B * Hs), threadgroup (32, 4, 1).
constexpr int rows_per_lane = Dk / 32;
uint n = thread_position_in_grid.z;  // b * Hs + state head
uint j = thread_position_in_grid.y;
uint lane = thread_index_in_simdgroup;

// q (B, Hs * R, T, Dk); k, log_g (B, Hs, T, Dk); v (B, Hs, T, Dv); o (B, Hs * R, T, Dv)
auto q_ = q + size_t(n) * R * T * Dk + lane;
auto k_ = k + size_t(n) * T * Dk + lane;
auto g_ = log_g + size_t(n) * T * Dk + lane;
auto v_ = v + size_t(n) * T * Dv + j;
auto o_ = o + size_t(n) * R * T * Dv + j;
size_t state_offset = size_t(n) * Dk * Dv + size_t(lane) * Dv + j;

float s[rows_per_lane];
for (int u = 0; u < rows_per_lane; ++u) {
  s[u] = state_in[state_offset + 32 * u * Dv];
}
for (int t = 0; t < T; ++t) {
  float v_t = static_cast<float>(v_[t * Dv]);
  for (int u = 0; u < rows_per_lane; ++u) {
    int i = t * Dk + 32 * u;
    s[u] = metal::exp(static_cast<float>(g_[i])) * s[u] + static_cast<float>(k_[i]) * v_t;
  }
  for (int r = 0; r < R; ++r) {
    float out = 0.0f;
    for (int u = 0; u < rows_per_lane; ++u) {
      out += static_cast<float>(q_[(r * T + t) * Dk + 32 * u]) * s[u];
    }
    out = simd_sum(out);
    if (lane == 0) {
      o_[(r * T + t) * Dv] = out;
    }
  }
}
for (int u = 0; u < rows_per_lane; ++u) {
  state_out[state_offset + 32 * u * Dv] = s[u];
}
