"""Training objectives. Each loss(model, inputs, targets, mask) returns
(loss sum, its normaliser, cross-entropy sum, cross-entropy tokens), so that gradient
accumulation and data parallelism can divide by the global normaliser.

The teacher is the original model: the same weights with softmax attention and LoRA off
(`Model.teacher()`).
"""

import mlx.core as mx
import mlx.nn as nn

OBJECTIVES = ("ce", "distill", "transfer")


def cross_entropy(model, inputs, targets, mask):
    logits = model(inputs).astype(mx.float32)
    ce_sum = (nn.losses.cross_entropy(logits, targets) * mask).sum()
    return ce_sum, mask.sum(), ce_sum, mask.sum(), logits


def make_loss(objective="ce", ce_weight=0.0):
    """ce: masked next-token cross-entropy. distill: KL(teacher || model) at every position,
    plus `ce_weight` of cross-entropy. transfer: layer-local attention transfer (LoLCATs stage
    1), the mean squared error between each linearized attention's output and the softmax
    attention's output on the teacher's own hidden states."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")

    def ce(model, inputs, targets, mask):
        return cross_entropy(model, inputs, targets, mask)[:4]

    def distill(model, inputs, targets, mask):
        _, _, ce_sum, n_targets, logits = cross_entropy(model, inputs, targets, mask)
        with model.teacher():
            teacher = mx.stop_gradient(model(inputs).astype(mx.float32))
        teacher_logp = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
        student_logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        kl = (mx.exp(teacher_logp) * (teacher_logp - student_logp)).sum(axis=-1)
        positions = mx.array(kl.size, dtype=mx.float32)
        return (1 - ce_weight) * kl.sum() + ce_weight * ce_sum, positions, ce_sum, n_targets

    def transfer(model, inputs, targets, mask):
        record = []
        with model.teacher(record) as attentions:
            mx.eval(model.hidden_states(inputs))  # the teacher's hidden states; no LM head
        total = mx.array(0.0)
        for attn, (x, y) in zip(attentions, record):
            error = attn(mx.stop_gradient(x)).astype(mx.float32) - mx.stop_gradient(y).astype(mx.float32)
            total = total + mx.square(error).mean(axis=-1).sum()
        norm = mx.array(float(inputs.size * len(record)))
        zero = mx.array(0.0)
        return total, norm, zero, zero

    return {"ce": ce, "distill": distill, "transfer": transfer}[objective]
