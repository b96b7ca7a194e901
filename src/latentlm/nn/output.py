"""The (H x V) output layer and its log-softmax, fused and computed in row blocks.

For a sentence model the output layer is most of the arithmetic (H x V per token against
about (E + H) x 4H for the LSTM), and under bf16 autocast the rest of its cost is memory
traffic: the (M, V) logits cast to fp32, log-softmax, its backward, the cast back. The
fused version keeps each block of rows' logits in cache: the forward computes
log softmax(W h + b)[target] with fp32 accumulation of the normalizer; the backward
recomputes the block's logits (one extra bf16 matrix product, cheap on bf16 units: AVX-512 BF16 here)
instead of storing (M, V) probabilities.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 256


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype products run in: bf16 under autocast on the weight's device type, else the weight's own."""
    kind = weight.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


def log_normalizer_(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of a (r, V) block, (r,) in fp32. Overwrites ``logits``
    with exp(logits - max) so the block is read from cache, not copied."""
    peak = logits.amax(1, keepdim=True)
    logits.sub_(peak).exp_()
    return peak.squeeze(1).float() + logits.sum(1, dtype=torch.float32).log()


def _block_logits(h_blk: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    return torch.addmm(bias, h_blk, weight_t, out=buf[: h_blk.size(0)])  # (r, V)


class _LinearLogSoftmaxGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, dtype):
        # h (M, H), weight (V, H) fp32 master, bias (V,), target (M,) -> (M,) fp32 log-probs
        w_t = weight.to(dtype).t()                               # (H, V)
        b = bias.to(dtype)
        x = h.to(dtype)
        M, V = x.size(0), weight.size(0)
        buf = torch.empty(min(M, BLOCK_ROWS), V, dtype=dtype, device=h.device)
        lse = torch.empty(M, dtype=torch.float32, device=h.device)
        tgt_logit = torch.empty(M, dtype=torch.float32, device=h.device)
        for s in range(0, M, BLOCK_ROWS):
            e = min(M, s + BLOCK_ROWS)
            logits = _block_logits(x[s:e], w_t, b, buf)
            tgt_logit[s:e] = logits.gather(1, target[s:e, None]).squeeze(1).float()
            lse[s:e] = log_normalizer_(logits)
        ctx.save_for_backward(x, w_t, b, target, lse)
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return tgt_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        x, w_t, b, target, lse = ctx.saved_tensors
        M, V = x.size(0), w_t.size(1)
        dtype = x.dtype
        buf = torch.empty(min(M, BLOCK_ROWS), V, dtype=dtype, device=x.device)
        grad_h = torch.empty(x.shape, dtype=ctx.h_dtype, device=x.device)
        grad_w = torch.zeros(V, x.size(1), dtype=torch.float32, device=x.device)
        grad_b = torch.zeros(V, dtype=torch.float32, device=x.device)
        g = grad_out.float()
        rows = torch.arange(BLOCK_ROWS, device=x.device)
        for s in range(0, M, BLOCK_ROWS):
            e = min(M, s + BLOCK_ROWS)
            logits = _block_logits(x[s:e], w_t, b, buf)
            # d log p(t) / d logits = onehot(t) - softmax; scaled by the incoming gradient
            logits.sub_(lse[s:e, None].to(dtype)).exp_().mul_(-g[s:e, None].to(dtype))
            logits[rows[: e - s], target[s:e]] += g[s:e].to(dtype)
            grad_h[s:e] = logits @ w_t.t()
            grad_w += (logits.t() @ x[s:e]).float()
            grad_b += logits.sum(0, dtype=torch.float32)
        return grad_h, grad_w.to(ctx.w_dtype), grad_b.to(ctx.w_dtype), None, None


def linear_log_softmax_gather(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                              dtype: torch.dtype | None = None) -> torch.Tensor:
    """log softmax(h W^T + b)[target] per row, (M,) fp32, differentiable in h, weight, bias.

    ``dtype`` is the compute dtype of the products (default: bf16 under autocast, else
    the weight's dtype); the normalizer is always accumulated in fp32.
    """
    if dtype is None:
        dtype = compute_dtype(weight)
    with torch.autocast(weight.device.type, enabled=False):
        return _LinearLogSoftmaxGather.apply(h, weight, bias, target, dtype)
