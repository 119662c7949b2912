// Gradients of gla_recurrent.metal. With dS_t the gradient with respect to S_t, backward in time:
//   dS_t = exp(log_g_{t+1}) dS_{t+1} + sum_r q_{t,r}^T do_{t,r}    (dS_{T-1} starts from dstate)
//   dq_{t,r} = do_{t,r} S_t^T,  dk_t = v_t dS_t^T,  dv_t = k_t dS_t,
//   dlog_g_t = exp(log_g_t) * rowsum(dS_t * S_{t-1}),  dstate_in = exp(log_g_0) dS_0.
// One simdgroup owns key row i of one state (b, state head); lane l keeps value columns
// j = l + 32 u of S and dS. S_{t-1} is recomputed forward from checkpoints taken every C steps,
// never by dividing by a gate. dv sums over rows: the W simdgroups of a threadgroup add their
// rows in threadgroup memory; each threadgroup writes one block of dv_blocks (summed outside).
// Launch: grid (32, Dk, B * Hs), threadgroup (32, W, 1).
constexpr int cols_per_lane = Dv / 32;
uint n = thread_position_in_grid.z;  // b * Hs + state head
uint i = thread_position_in_grid.y;
uint lane = thread_index_in_simdgroup;
uint w = thread_position_in_threadgroup.y;
uint block = threadgroup_position_in_grid.y;
uint heads = threads_per_grid.z;
int n_chunks = (T + C - 1) / C;

auto q_ = q + size_t(n) * R * T * Dk + i;
auto k_ = k + size_t(n) * T * Dk + i;
auto g_ = log_g + size_t(n) * T * Dk + i;
auto v_ = v + size_t(n) * T * Dv + lane;
auto dout_ = dout + size_t(n) * R * T * Dv + lane;
auto dq_ = dq + size_t(n) * R * T * Dk + i;
auto dk_ = dk + size_t(n) * T * Dk + i;
auto dg_ = dlog_g + size_t(n) * T * Dk + i;
auto dv_ = dv_blocks + (size_t(block) * heads + n) * T * Dv;
auto checkpoint_ = checkpoints + (size_t(n) * n_chunks * Dk + i) * Dv + lane;
size_t state_offset = (size_t(n) * Dk + i) * Dv + lane;

// Forward: keep the state entering each chunk.
float s[cols_per_lane];
for (int u = 0; u < cols_per_lane; ++u) {
  s[u] = state_in[state_offset + 32 * u];
}
for (int c = 0; c < n_chunks; ++c) {
  for (int u = 0; u < cols_per_lane; ++u) {
    checkpoint_[size_t(c) * Dk * Dv + 32 * u] = s[u];
  }
  for (int t = c * C; t < min(T, c * C + C); ++t) {
    float a = metal::exp(static_cast<float>(g_[t * Dk]));
    float k_t = static_cast<float>(k_[t * Dk]);
    for (int u = 0; u < cols_per_lane; ++u) {
      s[u] = a * s[u] + k_t * static_cast<float>(v_[t * Dv + 32 * u]);
    }
  }
}

threadgroup float dv_rows[2][W][Dv];
float ds[cols_per_lane];
float prev[C][cols_per_lane];
for (int u = 0; u < cols_per_lane; ++u) {
  ds[u] = dstate[state_offset + 32 * u];
}
int buf = 0;
for (int c = n_chunks - 1; c >= 0; --c) {
  // Recompute the chunk: prev[e] = S_{t-1} for t = c * C + e; s ends as the chunk's last state.
  int t0 = c * C;
  int len = min(C, T - t0);
  for (int u = 0; u < cols_per_lane; ++u) {
    s[u] = checkpoint_[size_t(c) * Dk * Dv + 32 * u];
  }
  for (int e = 0; e < len; ++e) {
    int t = t0 + e;
    float a = metal::exp(static_cast<float>(g_[t * Dk]));
    float k_t = static_cast<float>(k_[t * Dk]);
    for (int u = 0; u < cols_per_lane; ++u) {
      prev[e][u] = s[u];
      s[u] = a * s[u] + k_t * static_cast<float>(v_[t * Dv + 32 * u]);
    }
  }
  for (int e = len - 1; e >= 0; --e) {
    int t = t0 + e;
    float a = metal::exp(static_cast<float>(g_[t * Dk]));
    float k_t = static_cast<float>(k_[t * Dk]);
    for (int r = 0; r < R; ++r) {
      float q_t = static_cast<float>(q_[(r * T + t) * Dk]);
      float dq_t = 0.0f;
      for (int u = 0; u < cols_per_lane; ++u) {
        float dout_t = dout_[(r * T + t) * Dv + 32 * u];
        ds[u] += q_t * dout_t;
        dq_t += dout_t * s[u];
      }
      dq_t = simd_sum(dq_t);
      if (lane == 0) {
        dq_[(r * T + t) * Dk] = dq_t;
      }
    }
    float dk_t = 0.0f;
    float dg_t = 0.0f;
    for (int u = 0; u < cols_per_lane; ++u) {
      dk_t += ds[u] * static_cast<float>(v_[t * Dv + 32 * u]);
      dg_t += ds[u] * prev[e][u];
      dv_rows[buf][w][lane + 32 * u] = ds[u] * k_t;
    }
    dk_t = simd_sum(dk_t);
    dg_t = simd_sum(dg_t);
    if (lane == 0) {
      dk_[t * Dk] = dk_t;
      dg_[t * Dk] = a * dg_t;
    }
    // Two buffers: a row written for step t - 1 cannot overwrite one still read for step t.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint col = w * 32 + lane; col < Dv; col += W * 32) {
      float total = 0.0f;
      for (int x = 0; x < W; ++x) {
        total += dv_rows[buf][x][col];
      }
      dv_[size_t(t) * Dv + col] = total;
    }
    buf = 1 - buf;
    for (int u = 0; u < cols_per_lane; ++u) {
      ds[u] *= a;
      s[u] = prev[e][u];
    }
  }
}
for (int u = 0; u < cols_per_lane; ++u) {
  dstate_in[state_offset + 32 * u] = ds[u];
}
