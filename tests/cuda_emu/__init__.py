"""Runs the CUDA kernels of kernels/cuda/*.cuh on the CPU through a small emulator (emu.h).

``load()`` compiles emu_ops.cpp with g++ into build/cuda_emu/ (cached by a hash of the sources)
and returns the ctypes library, or raises ``Unavailable`` saying why (no g++, no CUDA headers).
``PYSONIC_EMU_SANITIZE=1`` builds it with AddressSanitizer, so out-of-bounds accesses of the
kernels abort (preload libasan into python for that run).
The helpers below mirror the host launchers of csrc/cuda/*.cu after their checks: shapes,
padding and scratch buffers are computed the same way, then the real kernels run.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KERNELS = ROOT / "kernels" / "cuda"
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class Unavailable(RuntimeError):
    pass


def _cuda_include() -> Path:
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_bf16.h").is_file():
            return Path(base) / "include"
    raise Unavailable("CUDA headers (cuda_bf16.h) not found; set CUDA_HOME")


_LIB = None


def load():
    global _LIB
    if _LIB is not None:
        return _LIB
    cxx = shutil.which("g++")
    if cxx is None:
        raise Unavailable("g++ not found")
    inc = _cuda_include()
    sources = sorted(KERNELS.glob("*.cuh")) + [HERE / "emu.h", HERE / "emu_ops.cpp"]
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
             "-Wno-unknown-pragmas", "-include", str(HERE / "emu.h"), "-DPYSONIC_CUDA_EMULATE",
             f"-I{inc}", f"-I{KERNELS}"]
    if os.environ.get("PYSONIC_EMU_SANITIZE") == "1":
        # Run python with LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0.
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
    digest = hashlib.sha256("\0".join(flags).encode())
    for s in sources:
        digest.update(s.read_bytes())
    out = ROOT / "build" / "cuda_emu" / f"emu_ops_{digest.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([cxx, *flags, str(HERE / "emu_ops.cpp"), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    _LIB = ctypes.CDLL(str(out))
    return _LIB


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


I64, F32, INT = ctypes.c_int64, ctypes.c_float, ctypes.c_int


def elu(x, alpha):
    """csrc/cuda/elu.cu after its checks: x dense; out with x's strides (here a fresh copy)."""
    lib = load()
    out = torch.full_like(x, float("nan"))
    if x.numel():
        lib.emu_elu(INT(DTYPE_CODE[x.dtype]), _p(x), _p(out), I64(x.numel()), F32(alpha))
    return out


def lstm_recurrence(gates_x, w_hh, h0, c0):
    """csrc/cuda/lstm.cu after its checks: fp32 state buffers, one launch per step."""
    lib = load()
    T, B, _ = gates_x.shape
    H = w_hh.shape[1]
    gx, w = gates_x.contiguous(), w_hh.contiguous()
    y = torch.full((T, B, H), float("nan"), dtype=gates_x.dtype)
    h_prev, h_next = h0.float().contiguous().clone(), torch.full((B, H), float("nan"))
    c = c0.float().contiguous().clone()
    code = INT(DTYPE_CODE[gates_x.dtype])
    for t in range(T):
        lib.emu_lstm_step(code, _p(gx[t]), _p(w), _p(h_prev), _p(h_next), _p(c), _p(y[t]), I64(B), I64(H))
        h_prev, h_next = h_next, h_prev
    return y, c.to(gates_x.dtype)


def flow_step(x, vc, vu, dt, g, *, vec=True):
    lib = load()
    x, vc = x.contiguous(), vc.contiguous()
    vu = vu.contiguous() if vu is not None else None
    out = torch.empty_like(x)
    if x.numel():
        a = dt * g if vu is not None else dt
        b = dt * (1.0 - g)
        lib.emu_flow_step(INT(DTYPE_CODE[x.dtype]), INT(int(vec)), _p(x), _p(vc), _p(vu), _p(out),
                          I64(x.numel()), F32(a), F32(b))
    return out


def diffusion_step(x, eps, noise, c1, c2, sigma, clip, *, vec=True):
    lib = load()
    x, eps = x.contiguous(), eps.contiguous()
    noise = noise.contiguous() if noise is not None else None
    B = x.shape[0]
    c1, c2, sigma = (torch.as_tensor(c, dtype=torch.float32).reshape(-1).expand(B).contiguous() for c in (c1, c2, sigma))
    out = torch.empty_like(x)
    if x.numel():
        n = x.numel() // B
        V = 16 // x.element_size()
        lib.emu_diffusion_step(INT(DTYPE_CODE[x.dtype]), INT(int(vec and n % V == 0)), _p(x), _p(eps), _p(noise), _p(out),
                               I64(B), I64(n), _p(c1), _p(c2), _p(sigma), F32(-1.0 if clip is None else clip))
    return out


def diffusion_step_x0(x, eps, noise, c1, c2, coef_x0, coef_x, sigma, clip, *, vec=True):
    lib = load()
    x, eps = x.contiguous(), eps.contiguous()
    noise = noise.contiguous() if noise is not None else None
    B = x.shape[0]
    coefs = [torch.as_tensor(c, dtype=torch.float32).reshape(-1).expand(B).contiguous() for c in (c1, c2, coef_x0, coef_x, sigma)]
    out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    if x.numel():
        n = x.numel() // B
        V = 16 // x.element_size()
        lib.emu_diffusion_step_x0(INT(DTYPE_CODE[x.dtype]), INT(int(vec and n % V == 0)), _p(x), _p(eps), _p(noise), _p(out),
                                  I64(B), I64(n), *(_p(c) for c in coefs), F32(-1.0 if clip is None else clip))
    return out


def rotary(x, cos, sin, interleaved):
    lib = load()
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        D = x.shape[-1]
        lib.emu_rotary(INT(DTYPE_CODE[x.dtype]), INT(int(cos.dtype == torch.float32)), _p(x), _p(cos), _p(sin), _p(out),
                       I64(x.numel() // D), I64(x.shape[2]), I64(D), I64(cos.shape[1]), INT(int(interleaved)))
    return out


def rvq_encode(x, codebooks, n_q, *, warps=None):
    lib = load()
    B, T, D = x.shape
    K = codebooks.shape[1]
    codes = torch.empty(B, T, n_q, dtype=torch.long)
    if B * T and n_q:
        if warps is None:
            warps = 4 if 4 * D * 4 <= 48 * 1024 else 1
        x = x.contiguous()
        books = codebooks.float().contiguous()
        lib.emu_rvq_encode(INT(DTYPE_CODE[x.dtype]), _p(x), _p(books), _p(codes), I64(B * T), I64(K), I64(D), I64(n_q), INT(warps))
    return codes


def rvq_decode(codes, codebooks):
    """Returns (out, err) with err = [flag, code, level, row] as the launcher reads it."""
    lib = load()
    B, T, n_q = codes.shape
    L, K, D = codebooks.shape
    out = torch.zeros(B, T, D, dtype=codebooks.dtype)
    err = torch.zeros(4, dtype=torch.long)
    if B * T and D and n_q:
        cc = codes.contiguous() if codes.dtype == torch.int32 else codes.long().contiguous()
        books = codebooks.contiguous()
        lib.emu_rvq_decode(INT(DTYPE_CODE[books.dtype]), INT(int(cc.dtype == torch.long)), _p(cc), _p(books), _p(out),
                           I64(B * T), I64(n_q), I64(K), I64(D), _p(err))
    return out, err


def _conv_shape(x, weight, causal):
    B, Tx, _ = x.shape
    C, K = weight.shape
    pad = K - 1 if causal else K // 2
    To = Tx if causal else Tx + 2 * (K // 2) - K + 1
    return B, Tx, C, K, To, pad


def conformer_conv(x, weight, bias, causal):
    lib = load()
    B, Tx, C, K, To, pad = _conv_shape(x, weight, causal)
    out = torch.empty(B, To, C, dtype=x.dtype)
    if out.numel():
        x, w, b = x.contiguous(), weight.contiguous(), bias.contiguous()
        lib.emu_conformer_conv(INT(DTYPE_CODE[x.dtype]), _p(x), _p(w), _p(b), _p(out), I64(B), I64(C), I64(K), I64(Tx), I64(To), I64(pad))
    return out


def conformer_conv_backward(go, x, weight, bias, causal):
    lib = load()
    B, Tx, C, K, To, pad = _conv_shape(x, weight, causal)
    gx = torch.zeros(B, Tx, 2 * C, dtype=x.dtype)
    gw = torch.zeros(C, K, dtype=x.dtype)
    gb = torch.zeros(C, dtype=x.dtype)
    if C == 0 or B * To == 0:
        return gx, gw, gb
    tiles = B * math.ceil(To / 64)
    P = min(tiles, 128)
    dy = torch.full((B, To, C), float("nan"))  # poisoned: every element must be written
    pw, pb = torch.full((P, C, K), float("nan")), torch.full((P, C), float("nan"))
    gx.fill_(float("nan"))
    x, w, b, go = x.contiguous(), weight.contiguous(), bias.contiguous(), go.contiguous()
    lib.emu_conformer_conv_backward(INT(DTYPE_CODE[x.dtype]), _p(go), _p(x), _p(w), _p(b), _p(dy), _p(gx), _p(pw), _p(pb), _p(gw), _p(gb),
                                    I64(P), I64(B), I64(C), I64(K), I64(Tx), I64(To), I64(pad))
    return gx, gw, gb


def _attn_args(q, k, scale):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return B, H, Hkv, Tq, Tk, D, scale, (64 if D <= 64 else 128)


def attention(q, k, v, causal=False, scale=None, key_lengths=None):
    lib = load()
    B, H, Hkv, Tq, Tk, D, scale, dmax = _attn_args(q, k, scale)
    out = torch.full((B, H, Tq, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, Tq), float("nan"))
    if B * H * Tq:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        kl = key_lengths.long().contiguous() if key_lengths is not None else None
        lib.emu_attention_fwd(INT(DTYPE_CODE[q.dtype]), INT(dmax), _p(q), _p(k), _p(v), _p(out), _p(lse), _p(kl),
                              I64(B), I64(H), I64(Hkv), I64(Tq), I64(Tk), INT(D), F32(scale), INT(int(causal)))
    return out, lse


def attention_backward(go, q, k, v, out, lse, causal=False, scale=None, key_lengths=None):
    lib = load()
    B, H, Hkv, Tq, Tk, D, scale, dmax = _attn_args(q, k, scale)
    nan = float("nan")
    dq = torch.full((B, H, Tq, D), nan, dtype=q.dtype)
    dk = torch.full((B, Hkv, Tk, D), nan, dtype=q.dtype)
    dv = torch.full((B, Hkv, Tk, D), nan, dtype=q.dtype)
    delta = torch.full((B, H, Tq), nan)
    tensors = [t.contiguous() for t in (go, q, k, v, out, lse)]
    kl = key_lengths.long().contiguous() if key_lengths is not None else None
    lib.emu_attention_bwd(INT(DTYPE_CODE[q.dtype]), INT(dmax), *(_p(t) for t in tensors), _p(delta), _p(dq), _p(dk), _p(dv), _p(kl),
                          I64(B), I64(H), I64(Hkv), I64(Tq), I64(Tk), INT(D), F32(scale), INT(int(causal)))
    return dq, dk, dv
