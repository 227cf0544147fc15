"""Plain-PyTorch definitions of every fused op: the definition of correct.

Every other backend (C++, CUDA, Triton) is tested against these functions. They favour clarity
over speed, but stay memory-safe on model-sized inputs. Shapes follow the op docstrings in
``pysonic.ops``; argument checking lives in the public wrappers, not here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention(q, k, v, causal=False, scale=None, key_lengths=None):
    """Softmax attention. q [B,H,Tq,D], k/v [B,Hkv,Tk,D] -> [B,H,Tq,D].

    Grouped-query (H % Hkv == 0); ``causal`` is bottom-right aligned (query i sees keys
    j <= i + Tk - Tq); ``key_lengths`` [B] hides keys j >= key_lengths[b]; a query row that sees
    no key returns zeros. Products run in the input dtype, the softmax in fp32.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B,H,Tq,Tk]
    visible = attention_mask(B, Tq, Tk, causal, key_lengths, q.device)  # [B,1,Tq,Tk]
    any_visible = visible.any(-1, keepdim=True)
    # Rows with no visible key would be NaN after softmax; give them finite scores, then zero.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~any_visible, 0.0)
    probs = torch.softmax(scores, dim=-1) * any_visible
    return probs.to(v.dtype) @ v


def attention_mask(B, Tq, Tk, causal, key_lengths, device):
    """Boolean [B,1,Tq,Tk] (or broadcastable) mask of the keys each query may see."""
    visible = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        visible = visible & (j <= i + (Tk - Tq))
    if key_lengths is not None:
        j = torch.arange(Tk, device=device)
        visible = visible & (j[None, :] < key_lengths.to(device)[:, None])[:, None, None, :]
    return visible.expand(B, 1, Tq, Tk)


def rotary(x, cos, sin, interleaved=False):
    """Rotary position embedding on the first R channels. x [B,H,T,D], cos/sin [T,R/2].

    Half-split pairs (i, i + R/2) by default; ``interleaved`` pairs (2i, 2i+1). Channels R..D
    pass through. Computed in the promoted dtype of x and cos, returned in x's dtype.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if interleaved:
        out = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        out = torch.cat((o1, o2), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def conformer_conv(x, weight, bias, causal=False):
    """GLU over channels, depthwise conv over time, SiLU. x [B,T,2C], weight [C,K], bias [C] -> [B,T,C].

    Same-length output: K//2 zeros on each side, or K-1 zeros on the left when ``causal``.
    """
    C, K = weight.shape
    gated = x[..., :C] * torch.sigmoid(x[..., C:])  # [B,T,C]
    gated = gated.transpose(1, 2)  # [B,C,T]
    gated = F.pad(gated, (K - 1, 0) if causal else (K // 2, K // 2))
    y = F.conv1d(gated, weight.unsqueeze(1), bias, groups=C)
    return F.silu(y).transpose(1, 2)


def rvq_encode(x, codebooks, n_q=None):
    """Residual VQ codes. x [B,T,D], codebooks [L,K,D] -> codes [B,T,n_q] int64.

    Level by level: the nearest code by exact squared L2 distance (ties to the lowest index),
    subtracted from the residual. Runs in fp32 whatever the input dtype.
    """
    n_q = codebooks.shape[0] if n_q is None else n_q
    B, T, D = x.shape
    residual = x.reshape(B * T, D).float()
    books = codebooks.float()
    # Exact differences, in chunks so that chunk * K * D stays around 16M elements.
    chunk = max(1, (1 << 24) // max(1, books.shape[1] * D))
    codes = torch.empty(B * T, n_q, dtype=torch.long, device=x.device)
    for level in range(n_q):
        for s in range(0, B * T, chunk):
            r = residual[s : s + chunk]
            dist = (r[:, None, :] - books[level][None]).square().sum(-1)  # [chunk,K]
            idx = dist.argmin(-1)  # first minimum: ties go to the lowest index
            codes[s : s + chunk, level] = idx
        residual = residual - books[level][codes[:, level]]
    return codes.reshape(B, T, n_q)


def rvq_decode(codes, codebooks):
    """Sum over levels of the looked-up codes. codes [B,T,n_q], codebooks [L,K,D] -> [B,T,D].

    Accumulates in fp32, returns codebooks' dtype.
    """
    out = torch.zeros(*codes.shape[:2], codebooks.shape[-1], dtype=torch.float32, device=codebooks.device)
    for level in range(codes.shape[-1]):
        out = out + codebooks[level].float()[codes[..., level].long()]
    return out.to(codebooks.dtype)


def flow_step(x, v_cond, v_uncond, dt, guidance_scale):
    """One Euler step of a guided flow: x + dt * (v_uncond + g * (v_cond - v_uncond)).

    With ``v_uncond=None``: x + dt * v_cond. fp32 arithmetic, x's dtype out.
    """
    if v_uncond is None:
        v = v_cond.float()
    else:
        v = v_uncond.float() + guidance_scale * (v_cond.float() - v_uncond.float())
    return (x.float() + dt * v).to(x.dtype)


def diffusion_step(x, eps, noise, c1, c2, sigma, clip=None):
    """One reverse-diffusion update: c1 * (x - c2 * eps) + sigma * noise, optionally clamped.

    ``c1``, ``c2``, ``sigma``: floats or [B] tensors (batch items may sit at different steps).
    ``noise=None`` means sigma is 0. fp32 arithmetic, x's dtype out.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    c1, c2, sigma = (torch.as_tensor(c, dtype=torch.float32, device=x.device).reshape(shape) for c in (c1, c2, sigma))
    out = c1 * (x.float() - c2 * eps.float())
    if noise is not None:
        out = out + sigma * noise.float()
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out.to(x.dtype)


def diffusion_step_x0(x, eps, noise, c1, c2, coef_x0, coef_x, sigma, clip=1.0):
    """A reverse-diffusion update through a clamped clean-signal estimate.

    ``x0 = c1 * (x - c2 * eps)``, clamped to [-clip, clip] unless ``clip`` is None, then
    ``coef_x0 * x0 + coef_x * x + sigma * noise`` (the DDPM posterior mean plus noise: ivanvovk
    WaveGrad's ``clip_denoised``, diffusers' ``clip_sample``). Coefficients: floats or [B] tensors;
    ``noise=None`` means sigma is 0. fp32 arithmetic, x's dtype out.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    c1, c2, coef_x0, coef_x, sigma = (
        torch.as_tensor(c, dtype=torch.float32, device=x.device).reshape(shape) for c in (c1, c2, coef_x0, coef_x, sigma)
    )
    xf = x.float()
    x0 = c1 * (xf - c2 * eps.float())
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = coef_x0 * x0 + coef_x * xf
    if noise is not None:
        out = out + sigma * noise.float()
    return out.to(x.dtype)


def lstm_recurrence(gates_x, w_hh, h0, c0):
    """The recurrent half of an LSTM layer, torch's gate order (input, forget, cell, output).

    ``gates_x`` [T,B,4H] is ``x_t @ w_ih^T + b_ih + b_hh`` for every step; ``w_hh`` [4H,H];
    ``h0``, ``c0`` [B,H]. Per step ``z = gates_x[t] + h @ w_hh^T``,
    ``c = sigmoid(z_f) * c + sigmoid(z_i) * tanh(z_g)``, ``h = sigmoid(z_o) * tanh(c)``.
    Returns ``(y [T,B,H], c_T [B,H])`` with ``y[t] = h_t``; fp32 arithmetic and state, inputs'
    dtype out.
    """
    w = w_hh.float()
    h, c = h0.float(), c0.float()
    ys = []
    for t in range(gates_x.shape[0]):
        z = gates_x[t].float() + h @ w.t()
        i, f, g, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h)
    y = torch.stack(ys) if ys else gates_x.new_empty(0, *h0.shape, dtype=torch.float32)
    return y.to(gates_x.dtype), c.to(gates_x.dtype)


def elu(x, alpha=1.0):
    """``x`` where ``x > 0``, else ``alpha * expm1(x)``; fp32 arithmetic, x's dtype out."""
    return torch.nn.functional.elu(x.float(), alpha).to(x.dtype)
