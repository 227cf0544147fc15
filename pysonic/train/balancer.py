"""Loss balancer (EnCodec, Défossez et al. 2022, section 3.4, "Balancer"; audiocraft's
``losses/balancer.py`` defines the same rule).

Several losses depend on the model only through one output ``y`` (the decoded waveform). Instead
of summing ``sum_k w_k L_k`` (whose gradient is dominated by whichever loss has the largest
gradient scale), the balancer takes each ``g_k = dL_k / dy``, tracks an exponential moving
average of its norm ``<||g_k||>``, and backpropagates

    g = sum_k  (w_k / sum_j w_j) * total_norm * g_k / (eps + <||g_k||>)

so each weight ``w_k`` is the share of the gradient that loss contributes, whatever its scale.

Differences from audiocraft, on purpose:
- the norm of ``g_k`` is taken per batch item and averaged (audiocraft's ``per_batch_item``),
  and the result is divided by the local batch size, so the gradient reaching the parameters is a
  batch *mean*: the same for one process with batch ``W * b`` as for ``W`` DDP processes with
  batch ``b`` (audiocraft's equals the sum over its local batch);
- the moving averages are averaged over processes every step, so every process applies the same
  scales.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Balancer:
    """Args (defaults from EnCodec / audiocraft):
        weights: loss name -> weight (the share of the gradient). Losses not named here are an error.
        balance_grads: False: plain weighted sum (``g = sum_k w_k g_k``), for comparison.
        total_norm: the norm the balanced gradient is scaled to (1.0).
        ema_decay: decay of the moving average of the gradient norms (0.999).
        epsilon: added to the averaged norms (1e-12).
    """

    def __init__(self, weights: dict[str, float], *, balance_grads: bool = True, total_norm: float = 1.0,
                 ema_decay: float = 0.999, epsilon: float = 1e-12) -> None:
        if not weights:
            raise ValueError("Balancer: weights must name at least one loss")
        bad = {k: w for k, w in weights.items() if not w >= 0}
        if bad or sum(weights.values()) <= 0:
            raise ValueError(f"Balancer: weights must be >= 0 with a positive sum, got {weights}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"Balancer: ema_decay must be in [0, 1), got {ema_decay}")
        self.weights = {k: float(w) for k, w in weights.items()}
        self.balance_grads, self.total_norm = balance_grads, float(total_norm)
        self.ema_decay, self.epsilon = float(ema_decay), float(epsilon)
        # bias-corrected EMA: avg = total / fix, both decayed every update
        self._total: dict[str, float] = {}
        self._fix: dict[str, float] = {}
        self.metrics: dict[str, float] = {}

    def _average(self, norms: dict[str, float]) -> dict[str, float]:
        out = {}
        for k, v in norms.items():
            self._total[k] = self._total.get(k, 0.0) * self.ema_decay + v
            self._fix[k] = self._fix.get(k, 0.0) * self.ema_decay + 1.0
            out[k] = self._total[k] / self._fix[k]
        return out

    def gradient(self, losses: dict[str, torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        """The balanced gradient with respect to ``output`` (``[B, ...]``), to pass to
        ``torch.autograd.backward(output, grad)`` (together with any other loss, in one call
        under DDP). Losses must be means over the batch."""
        unknown = sorted(set(losses) - set(self.weights))
        if unknown:
            raise ValueError(f"Balancer: no weight for loss(es) {unknown}; weights: {sorted(self.weights)}")
        if not losses:
            raise ValueError("Balancer: no losses")
        grads, norms = {}, {}
        for name, loss in losses.items():
            (g,) = torch.autograd.grad(loss, [output], retain_graph=True, allow_unused=True)
            if g is None:
                g = torch.zeros_like(output)
            grads[name] = g
            norms[name] = g.detach().float().flatten(1).norm(dim=1).mean()
        names = sorted(norms)
        vec = torch.stack([norms[k] for k in names]).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
            vec /= dist.get_world_size()
        avg = self._average(dict(zip(names, vec.tolist())))
        total_w = sum(self.weights[k] for k in names)
        batch = output.shape[0]
        out = torch.zeros_like(output)
        self.metrics = {}
        for k in names:
            if self.balance_grads:
                scale = self.weights[k] / total_w * self.total_norm / (self.epsilon + avg[k]) / batch
            else:
                scale = self.weights[k]
            out = out + scale * grads[k]
            self.metrics[f"grad_norm_{k}"] = avg[k]
        return out

    def state_dict(self) -> dict:
        names = sorted(self._total)
        return {"names": names, "total": torch.tensor([self._total[k] for k in names], dtype=torch.float64),
                "fix": torch.tensor([self._fix[k] for k in names], dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        names = list(state["names"])
        self._total = dict(zip(names, state["total"].tolist()))
        self._fix = dict(zip(names, state["fix"].tolist()))
