"""Decoders p(x | z): an LSTM language model that optionally reads a latent vector."""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from latentlm.data.vocab import Vocab
from latentlm.nn.dropout import Dropout
from latentlm.nn.output import (aligned_rows, block_logits, compute_dtype, linear_log_softmax_gather, log_normalizer_,
                                outside_unshifted_range, transposed_weights, unshifted_log_normalizer_)

#: when training uses the fused output layer: "cpu" (fp32 or bf16 products on the CPU), "bf16"
#: (under CPU autocast only), "always", "never"
FUSED_OUTPUT_MODE = "cpu"
_twice = threading.local()


@contextlib.contextmanager
def twice_differentiable():
    """Inside, training uses the plain output layer, whose backward is itself differentiable:
    for objectives that differentiate through gradient steps (SA-VAE's refinement). The fused
    layer's hand-written backward is not."""
    depth = getattr(_twice, "depth", 0)
    _twice.depth = depth + 1
    try:
        yield
    finally:
        _twice.depth = depth


def word_dropout(inputs: torch.Tensor, rate: float, unk_id: int = Vocab.unk_id) -> torch.Tensor:
    """Replace decoder input words by ``<unk>`` with probability ``rate`` (Bowman et al. 2016).

    ``<pad>`` and ``<s>`` are kept so the decoder still knows where a sentence starts.
    """
    if rate <= 0:
        return inputs
    drop = torch.rand(inputs.shape, device=inputs.device) < rate
    drop &= inputs > Vocab.bos_id  # ids 0/1 are <pad>/<s>
    return inputs.masked_fill(drop, unk_id)


class LSTMDecoder(nn.Module):
    """LSTM LM over ``<s> w_1 .. w_n``; with ``latent_dim > 0``, z sets the initial state
    and is concatenated to every input embedding (He et al. 2019's sentence-VAE decoder).
    """

    #: rows of the (rows x V) logits block used without autograd (see _inference_log_probs): (one
    #: thread, per thread when several). Into aligned rows larger blocks won (one quick IS-500
    #: measurement at one thread, fp32: 89 s per 100 sentences with 1,024 rows, 99 with 64); in
    #: bf16 the block size made less difference than the machine's noise from 128 to 1,024 rows
    INFERENCE_BLOCK_ROWS = {torch.float32: (1024, 512), torch.bfloat16: (512, 256)}

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 256,
        hidden_dim: int = 256,
        latent_dim: int = 0,
        num_layers: int = 1,
        dropout: float = 0.0,
        output_bias: bool = True,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocab.pad_id)
        self.lstm = nn.LSTM(embed_dim + latent_dim, hidden_dim, num_layers, batch_first=True)
        self.dropout = Dropout(dropout)
        # output_bias=False: no bias on the (H x V) layer, as in He et al. (2019)'s decoder
        self.out = nn.Linear(hidden_dim, vocab_size, bias=output_bias)
        if latent_dim:
            self.z_to_state = nn.Linear(latent_dim, hidden_dim * num_layers)

    def initial_state(self, z: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if z is None or not self.latent_dim:
            return None
        c0 = self.z_to_state(z).view(n, self.num_layers, self.hidden_dim).transpose(0, 1).contiguous()
        return torch.tanh(c0), c0  # (layers, N, H) each

    def hidden_states(self, inputs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Top-layer states (N, T, H) for inputs (N, T) and z (N, D) or None."""
        emb = self.dropout(self.embed(inputs))  # (N, T, E)
        if self.latent_dim:
            emb = torch.cat([emb, z[:, None, :].expand(-1, emb.size(1), -1)], dim=-1)
        states, _ = self.lstm(emb, self.initial_state(z, inputs.size(0)))
        return self.dropout(states)

    def shares_inputs(self) -> bool:
        """Whether :meth:`states_for_latents` applies: inference (no autograd, dropout off), one
        layer, a z read at every step."""
        return (not self.training and not torch.is_grad_enabled() and self.num_layers == 1
                and self.latent_dim > 0 and self.lstm.bias)

    def states_for_latents(self, inputs: torch.Tensor):
        """For one batch ``inputs`` (B, T) and many draws of z: a function z (S, B, D) -> the
        top-layer states (S*B, T, H), rows sample-major as ``inputs.repeat(S, 1)`` — the same
        numbers as :meth:`hidden_states` on the repeated batch, without its S-fold work on x.

        The input product W_ih [e(x_t); z] + b splits into W_e e(x_t) + b, computed here once
        for the batch, and W_z z, once per sample (not per step); the recurrence is then one
        (S*B, H) x (H, 4H) product per step. Gates are laid out (i, f, o, g) with the g rows
        doubled, so one in-place sigmoid serves all four (tanh(a) = 2 sigmoid(2a) - 1: ATen's
        CPU tanh ran at a seventh of sigmoid's speed); the cell state stays fp32. Under bf16
        autocast the products and gates run in bf16. Inference only (:meth:`shares_inputs`).
        """
        if not self.shares_inputs():
            raise RuntimeError("states_for_latents is an inference path: eval mode, no autograd, "
                               "one layer, a latent")
        lstm, H, (B, T) = self.lstm, self.hidden_dim, inputs.shape
        E = self.embed.embedding_dim
        dtype = compute_dtype(lstm.weight_hh_l0)
        device = inputs.device
        order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)])
        order = order.to(device)
        scale = torch.ones(4 * H, 1, device=device)
        scale[3 * H:] = 2.0
        with torch.autocast(device.type, enabled=False):
            w_ih = lstm.weight_ih_l0[order] * scale                      # (4H, E + D)
            w_hh_t = (lstm.weight_hh_l0[order] * scale).t().contiguous().to(dtype)  # (H, 4H)
            bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0)[order] * scale[:, 0]
            w_z_t = w_ih[:, E:].t().contiguous()                         # (D, 4H)
            x_gates = torch.addmm(bias, self.embed(inputs).reshape(B * T, E).float(), w_ih[:, :E].t())
            x_gates = x_gates.view(B, T, 4 * H).to(dtype)

        def states(z: torch.Tensor) -> torch.Tensor:
            S = z.size(0)
            N = S * B
            with torch.autocast(device.type, enabled=False):
                z = z.reshape(N, -1).float()
                z_gates = (z @ w_z_t).view(S, B, 4 * H).to(dtype)
                c = self.z_to_state(z)                                    # (N, H) fp32
                h = torch.tanh(c).to(dtype)
                out = torch.empty(N, T, H, dtype=dtype, device=device)
                gates = torch.empty(S, B, 4 * H, dtype=dtype, device=device)
                flat = gates.view(N, 4 * H)
                act = flat if dtype == torch.float32 else torch.empty(N, 4 * H, device=device)
                i, f, o, g = act[:, :H], act[:, H:2 * H], act[:, 2 * H:3 * H], act[:, 3 * H:]
                tanh_c = torch.empty(N, H, device=device)
                for t in range(T):
                    torch.add(z_gates, x_gates[:, t], out=gates)
                    flat.addmm_(h, w_hh_t)
                    flat.sigmoid_()                                       # i, f, o; sigmoid(2g)
                    if act is not flat:
                        act.copy_(flat)                                   # one cast, not one per op
                    c.mul_(f).addcmul_(i, g, value=2.0).sub_(i)           # c = f c + i tanh(g)
                    torch.mul(c, 2.0, out=tanh_c).sigmoid_().mul_(2.0).sub_(1.0)
                    h = out[:, t]
                    torch.mul(o, tanh_c, out=h)                           # h = o tanh(c)
            return out

        return states

    def token_log_probs(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(target_t | ...) summed over real positions: (N,).

        Only the masked positions go through the (H x V) output layer, and the
        log-softmax is taken in fp32 even under bf16 autocast. Without autograd
        (evaluation, importance sampling) a leaner path reuses one logits buffer.
        """
        full = bool(mask.all())  # equal lengths: no gather of the real positions, no scatter back
        if full:
            flat, tgt = states.reshape(-1, states.size(-1)), targets.reshape(-1)
        else:
            flat, tgt = states[mask], targets[mask]           # (M, H), (M,)
        if torch.is_grad_enabled() and self.fused_output(flat):
            tok = linear_log_softmax_gather(flat, self.out.weight, self.out.bias, tgt)
        elif torch.is_grad_enabled():
            logits = self.out(flat).float()                    # (M, V)
            tok = -F.cross_entropy(logits, tgt, reduction="none")  # (M,)
        else:
            tok = self._inference_log_probs(flat, tgt)
        if full:
            return tok.view(mask.shape).sum(1)
        out = torch.zeros(mask.shape, dtype=tok.dtype, device=tok.device)
        out[mask] = tok
        return out.sum(1)

    @staticmethod
    def fused_output(flat: torch.Tensor) -> bool:
        """Training uses the fused output layer on the CPU in fp32 and under bf16
        autocast: with its aligned-row (M, V) buffer its forward + backward ran 1.44x (1 thread)
        and 1.28x (2 threads) as fast as ``nn.Linear`` + cross-entropy in fp32 (M = 658, H = 256,
        V = 10,002; ``bench_output_layer.py --training``), 2.9x / 2.5x under bf16. On CUDA the
        plain cuBLAS product and cross-entropy are used, and in fp64 the plain path keeps full
        precision (the fused normalizer sums in fp32)."""
        if getattr(_twice, "depth", 0):
            return False
        if FUSED_OUTPUT_MODE == "cpu":
            return flat.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or flat.dtype == torch.float32)
        return FUSED_OUTPUT_MODE == "always" or (FUSED_OUTPUT_MODE == "bf16" and torch.is_autocast_enabled("cpu"))

    def _inference_log_probs(self, flat: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """log softmax(W h + b)[target] without autograd, (M,).

        The logits go block by block through a (rows x V) buffer kept between calls (so
        importance sampling with hundreds of chunks does not allocate and page-fault a fresh
        logits tensor each time). Its rows are padded to :data:`ALIGN_BYTES` (the padding holds
        -inf), as are the rows of the W^T copy: the products ran 1.3x faster into aligned rows.
        - fp32 / fp64 on the CPU: ATen's fused log-softmax, in place on the whole padded block
          (contiguous; the -inf columns add nothing), then the target's entry;
        - under bf16 autocast (or on a GPU) the product runs in the low precision and the
          normalizer is exp in place + a sum accumulated in fp32 and rounded to bf16 (no row
          max, :data:`UNSHIFTED_RANGE`; rows outside it are redone shifted) subtracted from the
          target logit, an fp32 dot product: a bf16 log-softmax would round every
          log-probability to bf16.
        ``benchmarks/bench_output_layer.py`` times each normalizer against the bare product.
        """
        weight, bias = self.out.weight, self.out.bias  # (V, H), (V,)
        dtype = compute_dtype(weight)
        w_t, b = transposed_weights(weight, bias, dtype)  # kept only inside frozen_parameters()
        M, V = flat.size(0), weight.size(0)
        threads = torch.get_num_threads()
        single, per_thread = self.INFERENCE_BLOCK_ROWS.get(dtype, (64, 64))
        rows = single if threads == 1 else per_thread * threads
        buf = getattr(self, "_logits_buffer", None)
        if buf is None or buf.dtype != dtype or buf.size(0) != rows or buf.device != flat.device:
            # aligned rows; the padding stays -inf, so the log-softmax may run over whole rows
            buf = self._logits_buffer = aligned_rows(rows, V, dtype, flat.device, fill=-math.inf)
        x = flat.to(dtype)
        in_place = flat.device.type == "cpu" and dtype in (torch.float32, torch.float64)
        out = torch.empty(M, dtype=torch.float32 if not in_place else dtype, device=flat.device)
        with torch.autocast(flat.device.type, enabled=False):
            for start in range(0, M, rows):
                stop = min(M, start + rows)
                logits = block_logits(x[start:stop], w_t, b, buf[:, :V])  # (r, V) view
                if in_place:  # the CPU kernel reads each row before it writes it
                    whole = buf[: stop - start]  # contiguous (a strided view would be copied)
                    torch.log_softmax(whole, 1, out=whole)
                    out[start:stop] = whole.gather(1, tgt[start:stop, None]).squeeze(1)
                else:
                    out[start:stop] = unshifted_log_normalizer_(logits)
            if in_place:
                return out.float()
            for part in outside_unshifted_range(out).split(rows):
                out[part] = log_normalizer_(block_logits(x[part], w_t, b))
        target = (flat.float() * weight[tgt].float()).sum(-1)  # (M,) fp32
        if bias is not None:
            target = target + bias[tgt].float()
        return target - out

    @torch.no_grad()
    def generate(
        self, z: torch.Tensor | None, num: int, max_len: int = 50, greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode ``num`` sentences (ancestral sampling, or greedy); (num, <= max_len) ids ending in </s>."""
        device = self.out.weight.device
        state = self.initial_state(z, num)
        token = torch.full((num, 1), Vocab.bos_id, dtype=torch.long, device=device)
        done = torch.zeros(num, dtype=torch.bool, device=device)
        out = []
        for _ in range(max_len):
            emb = self.embed(token)
            if self.latent_dim:
                emb = torch.cat([emb, z[:, None, :]], dim=-1)
            h, state = self.lstm(emb, state)
            logits = self.out(h[:, -1]).float()
            logits[:, [Vocab.pad_id, Vocab.bos_id]] = -float("inf")
            if greedy:
                token = logits.argmax(-1, keepdim=True)
            else:
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            token = token.masked_fill(done[:, None], Vocab.pad_id)
            out.append(token)
            done |= token[:, 0] == Vocab.eos_id
            if bool(done.all()):
                break
        return torch.cat(out, dim=1)
