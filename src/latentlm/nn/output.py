"""The (H x V) output layer and its log-softmax, fused.

For a sentence model the output layer is most of the arithmetic (H x V per token against
about (E + H) x 4H for the LSTM), and under bf16 autocast the rest of its cost is memory
traffic: the (M, V) logits cast to fp32, log-softmax, its backward, the cast back. The
fused version computes log softmax(W h + b)[target] with the normalizer accumulated in fp32
and leaves exp(logit - shift) in one aligned-row (M, V) tensor of the compute dtype (half
the bytes of fp32 logits under bf16); the backward rescales it in place to the logits'
gradient and runs the two products over all rows at once. (It used to recompute the logits
block by block in the backward: one more (M, H, V) product per step: forward + backward of
this layer took 1.35x as long, M = 658, H = 256, V = 10k, bf16, one thread.) Inference
(:meth:`LSTMDecoder._inference_log_probs`) goes block by block through a kept buffer instead.
"""

from __future__ import annotations

import contextlib
import threading

import torch

#: rows per product when the few rows outside UNSHIFTED_RANGE are recomputed shifted
BLOCK_ROWS = 256

_frozen = threading.local()  # .copies: {(weight ptr, bias ptr, dtype): (weight^T, bias)} inside a block, else unset


@contextlib.contextmanager
def frozen_parameters():
    """Inside, the caller promises that no parameter changes, so the output layer may keep
    its transposed contiguous (and, under autocast, bf16) copy of the weights between calls:
    validation and importance sampling (hundreds of decoder passes per batch) copy the (V, H)
    matrix once per block, not once per call. The copies are dropped when the outermost block ends.

    The promise cannot be checked by the tensors' version counters: a fused optimizer
    (``torch.optim.Adam(fused=True)``) updates parameters in place without bumping
    ``_version``. A cache keyed on it kept the first validation's output layer for a whole
    bf16 training run, and every later validation NLL was scored with stale weights."""
    outer = getattr(_frozen, "copies", None) is not None
    if not outer:
        _frozen.copies = {}
    try:
        yield
    finally:
        if not outer:
            _frozen.copies = None


#: rows of the output layers' W^T copy and logits buffers start a multiple of this many bytes
#: apart: with V = 10,004 fp32 columns (40,016-byte rows) (1,024 x 256) x (256 x V) products ran
#: 69 / 129 GFLOP/s (1 / 2 threads) into unpadded rows and 97 / 162 into padded ones
#: (benchmarks/bench_aligned_rows.py; BENCHMARKS.md)
ALIGN_BYTES = 64


def padded_columns(cols: int, dtype: torch.dtype) -> int:
    """``cols`` rounded up so that a row of ``dtype`` is a multiple of :data:`ALIGN_BYTES`."""
    per = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-cols // per) * per


def aligned_rows(rows: int, cols: int, dtype: torch.dtype, device=None, fill: float | None = None) -> torch.Tensor:
    """A (rows, padded_columns(cols)) tensor, filled with ``fill`` unless None: ``[:, :cols]``
    is the aligned-row (rows, cols) view to compute into; the padding keeps ``fill``."""
    shape = (rows, padded_columns(cols, dtype))
    if fill is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)


def transposed_weights(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight^T, bias) in ``dtype``, weight^T (H, V) with unit column stride and rows
    :data:`ALIGN_BYTES`-aligned (a view of a padded copy): the row-block products run about
    1.2x faster on it than on the transposed view (fp32, 64-row blocks, one thread). Made
    once per :func:`frozen_parameters` block; outside one, converted afresh when ``dtype`` differs
    from the weight's, else the transposed view."""
    copies = getattr(_frozen, "copies", None)
    if copies is None and dtype == weight.dtype:
        return weight.detach().t(), None if bias is None else bias.detach()  # a one-off call: the copy would not pay
    key = (weight.data_ptr(), None if bias is None else bias.data_ptr(), dtype)
    if copies is not None and key in copies:
        return copies[key]
    V, H = weight.shape
    w_t = aligned_rows(H, V, dtype, weight.device, fill=0.0)[:, :V]
    w_t.copy_(weight.detach().t())
    copy = (w_t, None if bias is None else bias.detach().to(dtype))
    if copies is not None:
        copies[key] = copy
    return copy


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype products run in: bf16 under autocast on the weight's device type, else the weight's own."""
    kind = weight.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


#: an unshifted log-normalizer inside this range is exact to rounding: no exp overflowed (every
#: logit is below it), and the largest term, >= exp(low - log V), is a normal number, so the terms
#: that underflowed are below exp(-87 - low + log V) of the sum. Rows outside are recomputed shifted.
UNSHIFTED_RANGE = (-40.0, 80.0)


def unshifted_log_normalizer_(logits: torch.Tensor, fp32_sum: bool = False) -> torch.Tensor:
    """log sum exp over the last dim of a (r, V) block without the row max, (r,) in fp32: two
    passes over the block (exp in place, sum) instead of four (max, subtract, exp, sum). Exact
    where the result lies in :data:`UNSHIFTED_RANGE`; outside it (overflow gives inf) the caller
    must recompute the row with :func:`log_normalizer_`. Overwrites ``logits`` with exp(logits).

    A bf16 block's sum (the default, which training and inference both use) still accumulates
    in fp32 in ATen's CPU kernel but is rounded to bf16 — up to 2^-9 relative, 0.002 nats on the
    log — which skips the conversion of the whole block to fp32 that an fp32 result costs it (a
    third pass; 7 % of bf16 IS-500). ``fp32_sum=True`` asks for the fp32 result (the benchmark's
    comparison)."""
    if fp32_sum or logits.dtype == torch.float32:
        return logits.exp_().sum(1, dtype=torch.float32).log_()
    return logits.exp_().sum(1).float().log_()


def outside_unshifted_range(lse: torch.Tensor) -> torch.Tensor:
    """Indices of the rows whose unshifted log-normalizer is not exact (outside
    :data:`UNSHIFTED_RANGE`, inf or NaN): the ones to redo with :func:`log_normalizer_`. One
    check per call, not per block (a GPU synchronizes on it)."""
    low, high = UNSHIFTED_RANGE
    return (~((lse > low) & (lse < high))).nonzero().squeeze(1)


def log_normalizer_(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of a (r, V) block, (r,) in fp32. Overwrites ``logits``
    with exp(logits - max) so the block is read from cache, not copied."""
    peak = logits.amax(1, keepdim=True)
    logits.sub_(peak).exp_()
    return peak.squeeze(1).float() + logits.sum(1, dtype=torch.float32).log()


def block_logits(h_blk: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                 buf: torch.Tensor | None = None) -> torch.Tensor:
    """h W^T (+ b), (r, V), into the first r rows of ``buf`` when given."""
    out = None if buf is None else buf[: h_blk.size(0)]
    if bias is None:
        return torch.mm(h_blk, weight_t, out=out)
    return torch.addmm(bias, h_blk, weight_t, out=out)


class _LinearLogSoftmaxGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, dtype):
        # h (M, H), weight (V, H) fp32 master, bias (V,), target (M,) -> (M,) fp32 log-probs
        w_t = weight.to(dtype).t()                               # (H, V)
        b = None if bias is None else bias.to(dtype)
        x = h.to(dtype)
        M, V = x.size(0), weight.size(0)
        # One product over all rows into one aligned-row (M, V) tensor of the compute dtype, turned in
        # place into exp(logit - peak), peak = 0 (the unshifted normalizer, two passes) or, for
        # rows outside UNSHIFTED_RANGE, the row max; the backward scales those rows to softmax
        # probabilities instead of recomputing the product. (Row blocks of 256, each normalized
        # while in cache, were slower at two threads: fp32 forward + backward 73.3 -> 63.0 ms,
        # M = 658, V = 10k, `bench_output_layer.py --training`; BENCHMARKS.md.)
        probs = aligned_rows(M, V, dtype, h.device)[:, :V]  # aligned rows: faster products, both ways
        block_logits(x, w_t, b, probs)
        peak = torch.zeros(M, dtype=torch.float32, device=h.device)
        tgt_logit = probs.gather(1, target[:, None]).squeeze(1).float()
        lse = unshifted_log_normalizer_(probs)  # a bf16 block's sum rounded once: no fp32 copy of it
        for part in outside_unshifted_range(lse).split(BLOCK_ROWS):
            logits = block_logits(x[part], w_t, b)
            top = logits.amax(1, keepdim=True)
            probs[part] = logits.sub_(top).exp_()
            peak[part] = top.squeeze(1).float()
            lse[part] = peak[part] + probs[part].sum(1, dtype=torch.float32).log()
        ctx.save_for_backward(x, w_t, target, probs, peak - lse)
        ctx.h_dtype, ctx.w_dtype, ctx.has_bias = h.dtype, weight.dtype, bias is not None
        ctx.consumed = False
        return tgt_logit - lse

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.consumed:  # the saved probabilities are overwritten below
            raise RuntimeError("linear_log_softmax_gather: backward through the same graph twice is not supported")
        ctx.consumed = True
        x, w_t, target, probs, shift = ctx.saved_tensors
        g = grad_out.float()
        # d log p(t) / d logits = onehot(t) - softmax, scaled by the incoming gradient;
        # softmax = probs * exp(peak - lse) row by row
        grad_logits = probs.mul_((-g * shift.exp()).to(probs.dtype)[:, None])
        grad_logits[torch.arange(x.size(0), device=x.device), target] += g.to(probs.dtype)
        grad_h = (grad_logits @ w_t.t()).to(ctx.h_dtype)
        grad_w = (grad_logits.t() @ x).to(ctx.w_dtype)
        grad_b = grad_logits.sum(0, dtype=torch.float32).to(ctx.w_dtype) if ctx.has_bias else None
        return grad_h, grad_w, grad_b, None, None


def linear_log_softmax_gather(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                              dtype: torch.dtype | None = None) -> torch.Tensor:
    """log softmax(h W^T + b)[target] per row, (M,) fp32, differentiable in h, weight, bias.

    ``dtype`` is the compute dtype of the products (default: bf16 under autocast, else
    the weight's dtype); the normalizer is always accumulated in fp32.
    """
    if dtype is None:
        dtype = compute_dtype(weight)
    with torch.autocast(weight.device.type, enabled=False):
        return _LinearLogSoftmaxGather.apply(h, weight, bias, target, dtype)
