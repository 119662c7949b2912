"""LoLA: LoLCATs with a sparse cache of `slots` keys per KV head, against a token-by-token reference that keeps
the three memories as explicit sets of positions: the window, the exact keys beyond it (the
pending block and the cache) and the state."""

import math

import mlx.core as mx
import pytest

from mlx_linear import decode
from mlx_linear.attention import Rope

from conftest import TINY, cache_bytes, incremental, tiny_model
from test_lolcats import lolcats_model

WINDOW = 8  # the tiny models' window, and so the block


def sparse_model(slots=3, sinks=0, seed=0, sink_horizon=0, **options):
    return lolcats_model(sinks=sinks, method="lola", seed=seed, sink_horizon=sink_horizon, slots=slots, **options)


def distinct_tokens(batch, length, seed=1):
    """No token twice: a repeated token gives equal keys at layer 0, whose scores tie to rounding."""
    mx.random.seed(seed)
    return mx.stack([mx.random.permutation(TINY["vocab_size"])[:length] for _ in range(batch)])


def reference(attn, x, slots, sinks=0, half_life=0.0, after_rope=True, horizon=2048, cache_half_life=0.0, cache_span=64,
              cache_unique=0.0, long_slots=0, sinks_in_state=True, sink_horizon=0):
    """Token by token. At the start of block b (t = bC, C = W) the cache and the keys of block
    b - 2 (sinks aside) are ranked by || phi(k) S / phi(k) z - v ||^2 summed over the query heads
    of their KV head, S and z as they were; the `slots` largest stay (equal scores: the older),
    the rest (and the block's sinks) join the state.
    Query t = bC + r reads exactly: the window and sinks, block b - 1's keys up to t - W (their
    true positions), the cache (filled from its last slot back, in the order of positions, slot j
    at position j * cache_span // slots, scored from 2W + cache_span); and the state, each key decayed by
    2^(-(t - W - s) / half_life). Keys more than `horizon` back at a boundary join the state
    (horizon 0: none), but for the `long_slots` best ranked of them. With `cache_half_life`, a key's
    error is ranked times 2^(-(t - s) / it).
    With `cache_unique`, a key whose key and value cosines with a better-ranked key's both exceed
    it, one of the two from block b - 2, joins the state. Sinks join it only with `sinks_in_state`,
    and are read from min(t, sink_horizon) (0: W + sinks - 1)."""
    B, L, _ = x.shape
    H, Hkv, m, W = attn.n_heads, attn.n_kv_heads, attn.method, WINDOW
    R = H // Hkv
    q, k, v = attn.project(x)
    qr, kr = attn.rope(q), attn.rope(k)
    far_q = attn.rope(q[..., None, :], offset=2 * W + cache_span)[..., 0, :]
    at_slot = lambda key, j: attn.rope(key[None, None, None], offset=j)[0, 0, 0]  # noqa: E731

    def phi(x, w):
        y = x @ w
        return mx.concatenate([mx.softmax(y, axis=-1), mx.softmax(-y, axis=-1)], axis=-1)

    def similar(a, b):
        return ((a * b).sum() / mx.sqrt((a * a).sum() * (b * b).sum())).item() > cache_unique

    fq = phi(qr if after_rope else q, m.q_map)
    fk = phi(mx.repeat(kr if after_rope else k, R, axis=1), m.k_map)
    g = mx.sigmoid(m.window_logit)[:, 0, 0]
    decay = (lambda n: 0.5 ** (n / half_life)) if half_life else (lambda n: 1.0)
    scale = q.shape[-1] ** -0.5
    out = [[None] * H for _ in range(B)]
    for b in range(B):
        for j in range(Hkv):
            heads = range(j * R, (j + 1) * R)
            cache, state, rows = [], [], {h: [] for h in heads}
            for t in range(L):
                if t % W == 0:  # a boundary
                    candidates = cache + [s for s in range(t - 2 * W, t - W) if s >= sinks]
                    oldest = t - horizon if horizon else -math.inf  # horizon 0: none
                    expired = [] if long_slots else [s for s in candidates if s < oldest]
                    candidates = [s for s in candidates if s not in expired]

                    def error(s):
                        total = 0.0
                        for h in heads:
                            num = sum(decay(t - W - u) * (fk[b, h, s] * fk[b, h, u]).sum() * v[b, j, u] for u in state)
                            den = sum(decay(t - W - u) * (fk[b, h, s] * fk[b, h, u]).sum() for u in state)
                            guess = num / den if state else mx.zeros(v.shape[-1])
                            total += ((guess - v[b, j, s]) ** 2).sum().item()
                        return total

                    aged = (lambda s: 0.5 ** ((t - s) / cache_half_life)) if cache_half_life else (lambda s: 1.0)
                    ranked = sorted(candidates, key=lambda s: (-error(s) * aged(s), s))
                    copies = [s for i, s in enumerate(ranked) if cache_unique and any(
                        (s >= t - 2 * W or u >= t - 2 * W) and similar(k[b, j, s], k[b, j, u]) and similar(v[b, j, s], v[b, j, u])
                        for u in ranked[:i])]
                    ranked = [s for s in ranked if s not in copies]
                    expired = expired + [s for s in ranked if s < oldest][long_slots:]
                    ranked = [s for s in ranked if s not in expired]
                    cache = sorted(ranked[:slots])
                    sinks_left = list(range(max(0, t - 2 * W), min(sinks, t - W))) if sinks_in_state else []
                    state += expired + copies + ranked[slots:] + sinks_left
                block_start = t - t % W
                pending = [s for s in range(block_start - W, t - W + 1) if s >= max(sinks, 0)]
                recent = list(range(max(0, t - W + 1), t + 1))
                old_sinks = [u for u in range(min(sinks, t + 1)) if u not in recent]
                for h in heads:
                    q_sink = attn.rope(q[b, h, t][None, None, None], offset=min(t, sink_horizon or W + sinks - 1))[0, 0, 0]
                    window = [(q_sink * kr[b, j, u]).sum() for u in old_sinks] + [(qr[b, h, t] * kr[b, j, u]).sum() for u in recent]
                    top = (mx.stack(window) * scale).max()
                    terms = [(mx.exp(s * scale - top), u) for s, u in zip(window, old_sinks + recent)]
                    terms += [(mx.exp((qr[b, h, t] * kr[b, j, u]).sum() * scale - top), u) for u in pending]
                    slot = {u: (slots - len(cache) + i) * cache_span // slots for i, u in enumerate(cache)}
                    terms += [(mx.exp((far_q[b, h, t] * at_slot(k[b, j, u], slot[u])).sum() * scale - top), u) for u in cache]
                    num = sum(g[h] * e * v[b, j, u] for e, u in terms)
                    den = sum(g[h] * e for e, _ in terms)
                    for u in state:
                        a = decay(t - W - u) * (fq[b, h, t] * fk[b, h, u]).sum()
                        num, den = num + a * v[b, j, u], den + a
                    rows[h].append(num / den)
            for h in heads:
                out[b][h] = mx.stack(rows[h])
    out = mx.stack([mx.stack(heads) for heads in out])
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def layer_input(attn, length, batch=2, seed=3):
    """Layer inputs whose keys and values are all different (no ties at the boundaries)."""
    mx.random.seed(seed)
    return mx.random.normal((batch, length, TINY["hidden_size"]))


@pytest.mark.parametrize("options", [{}, {"half_life": 6.0, "after_rope": False}, {"horizon": 20}, {"horizon": 0},
                                     {"horizon": 0, "cache_half_life": 10.0}, {"cache_span": 0}, {"horizon": 0, "cache_span": 7},
                                     {"horizon": 0, "cache_unique": 0.5}, {"cache_unique": 0.3, "cache_half_life": 10.0},
                                     {"horizon": 12, "long_slots": 1}, {"horizon": 10, "long_slots": 2, "cache_unique": 0.5}])
@pytest.mark.parametrize("slots,sinks", [(3, 0), (2, 2), (12, 1)])
def test_follows_the_reference(slots, sinks, options):
    """41 tokens (five boundaries; the cache full, then keys moving between it and the state)."""
    attn = sparse_model(slots, sinks, **options).layers[0].self_attn
    x = layer_input(attn, 41)
    assert mx.allclose(attn(x), reference(attn, x, slots, sinks, **options), atol=1e-4).item()


@pytest.mark.parametrize("sinks_in_state,sink_horizon", [(False, 0), (True, 30), (False, 30)])
def test_follows_the_reference_with_the_sinks_out_of_the_state_or_where_they_lie(sinks_in_state, sink_horizon):
    attn = sparse_model(2, 2, sink_horizon=sink_horizon, sinks_in_state=sinks_in_state, half_life=6.0).layers[0].self_attn
    x = layer_input(attn, 41)
    expected = reference(attn, x, 2, 2, half_life=6.0, sinks_in_state=sinks_in_state, sink_horizon=sink_horizon)
    assert mx.allclose(attn(x), expected, atol=1e-4).item()


def test_follows_the_reference_without_rotary_tables():
    """A RoPE that the tables do not serve (partial rotary, dynamic scaling) is called itself:
    the cache's slots each at their own position too."""
    attn = sparse_model(12, 1, cache_span=7).layers[0].self_attn
    attn.rotary = None
    x = layer_input(attn, 41)
    assert mx.allclose(attn(x), reference(attn, x, 12, 1, cache_span=7), atol=1e-4).item()


def test_gradients_follow_the_reference():
    attn = sparse_model(3, 1, half_life=6.0).layers[1].self_attn
    x = layer_input(attn, 30, batch=1)

    def loss(forward, params):
        attn.method.update(params)
        return forward(x).square().sum()

    params = dict(attn.method.parameters())
    ours = mx.grad(lambda p: loss(attn, p))(params)
    theirs = mx.grad(lambda p: loss(lambda x: reference(attn, x, 3, 1, half_life=6.0), p))(params)
    for name in ("q_map", "k_map", "window_logit"):
        assert mx.abs(ours[name]).max() > 0
        assert mx.allclose(ours[name], theirs[name], atol=1e-4, rtol=1e-3).item(), name


@pytest.mark.parametrize("sinks,options", [(0, {}), (2, {"half_life": 6.0, "after_rope": False}),
                                           (1, {"horizon": 0, "cache_half_life": 10.0}),
                                           (2, {"sink_horizon": 40, "sinks_in_state": False})])
def test_prefill_pieces_then_decode_equals_full_forward(sinks, options):
    model = sparse_model(3, sinks, **options)
    tokens = distinct_tokens(2, 60)
    full = model(tokens)
    for split in ([5, 9, 1, 12], [9, 3, 1, 10], [20], [8, 8, 16], [60]):
        assert mx.allclose(full, incremental(model, tokens, split)[0], atol=1e-4).item(), split


def test_state_size_is_constant():
    """Beside LoLCATs' S: the last two blocks' raw keys, values (per KV head) and features (per
    query head), and the cache's keys, values, features and positions."""
    slots, sizes = 5, cache_bytes(sparse_model(5), lengths=(20, 300))
    H, Hkv, d, W = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"], WINDOW
    F = d  # two softmaxes of d/2
    state = H * F * (d + 1) + 2 * W * (2 * Hkv * d + H * F) + slots * (2 * Hkv * d + H * F + Hkv)
    window = 2 * W * Hkv * d
    assert sizes[0] == sizes[1] == TINY["num_hidden_layers"] * 4 * (state + window)


def test_the_cache_holds_what_the_state_recalls_worst():
    """A key and value unlike all others (a pass key in filler) stays in the cache."""
    model = sparse_model(2)
    attn = model.layers[0].self_attn
    filler = mx.tile(layer_input(attn, 4, batch=1, seed=5), (1, 12, 1))  # four inputs, repeated
    needle = 3.0 * layer_input(attn, 1, batch=1, seed=6)
    x = mx.concatenate([filler[:, :10], needle, filler[:, 10:]], axis=1)
    _, state = attn.method(*attn.project(x), Rope(attn.rope, 0))
    positions = state[-1][0]  # (Hkv, slots)
    assert all(10 in row for row in positions.tolist())
    for wrong in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"slots={wrong}: give a whole number"):
            tiny_model(method="lola", options={"slots": wrong})


@pytest.mark.parametrize("slots,sinks,options", [(3, 0, {"horizon": 0}), (12, 1, {}), (2, 2, {"cache_half_life": 10.0})])
def test_a_copy_leaves_the_cache(slots, sinks, options):
    """Repeated text (four inputs over and over, each time a little changed): with `cache_unique`,
    a key with a better-ranked copy joins the state, as in the reference, so the cache holds one
    of each; without it, copies hold the cache."""
    attn = sparse_model(slots, sinks, **options).layers[0].self_attn
    x = mx.tile(layer_input(attn, 4, seed=5), (1, 11, 1)) + 0.05 * layer_input(attn, 44, seed=6)
    with_copies = attn(x)
    attn.method.unique = 0.9
    assert mx.allclose(attn(x), reference(attn, x, slots, sinks, cache_unique=0.9, **options), atol=1e-4).item()
    assert not mx.allclose(attn(x), with_copies, atol=1e-3).item()
    _, state = attn.method(*attn.project(x), Rope(attn.rope, 0))
    for row in state[-1].reshape(-1, slots).tolist():
        kept = [int(p) % 4 for p in row if p >= 0]
        assert len(kept) == len(set(kept)) > 0


def test_compiled_decode_takes_every_step_boundaries_included(monkeypatch):
    """Once the window is full, decode.py's compiled step takes every token: between block
    boundaries one function, at them (choosing the cache) another; both equal the plain path,
    with the chat's options (maps before RoPE, a half-life, sinks)."""
    model = sparse_model(3, 2, half_life=6.0, after_rope=False)
    tokens = distinct_tokens(1, 60)
    runs, compiled_at, stock = [], [], decode.decode

    def counted(model, tokens, cache):
        compiled_at.append(cache[0].caches[1].offset)
        return stock(model, tokens, cache)

    monkeypatch.setattr(decode, "decode", counted)
    for compiled in (False, True):
        model.compile_decode = compiled
        runs.append(incremental(model, tokens, [13]))
    assert compiled_at == list(range(13, 60))
    assert set(model._decode_steps) == {False, True}  # a boundary step and the others
    assert mx.allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5).item()
    for x, y in zip(runs[0][1], runs[1][1]):
        assert all(mx.allclose(a, b, rtol=1e-5, atol=1e-5).item() for a, b in zip(x.caches[0].cache, y.caches[0].cache))


def test_no_absolute_position_is_read():
    """With position-free maps (after_rope=false) and no decay, a chunk's output and new state
    depend on its position only through the block phase: the cache is read from fixed positions,
    the pending keys from their true one. So 10,000 positions later (past the tiny models' 4,096
    trained ones) the same state and tokens give the same terms."""
    attn = sparse_model(3, after_rope=False).layers[0].self_attn
    x = layer_input(attn, 45, batch=1)
    q, k, v = attn.project(x)
    prefix = Rope(attn.rope, 0)
    _, state = attn.method(q[:, :, :37], k[:, :, :37], v[:, :, :37], prefix)
    terms = []
    for shift in (0, 1250 * WINDOW):
        moved = state[:-1] + [mx.where(state[-1] >= 0, state[-1] + shift, -1.0)]  # the cache's positions
        terms.append(attn.method(q[:, :, 37:], k[:, :, 37:], v[:, :, 37:], Rope(attn.rope, 37 + shift), moved))
    assert mx.allclose(terms[0][0], terms[1][0], atol=1e-5).item()
    assert all(mx.allclose(a, b, atol=1e-5).item() for a, b in zip(terms[0][1][:-1], terms[1][1][:-1]))
