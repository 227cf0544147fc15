"""Training mode of the residual VQ: straight-through output, commitment loss, EMA k-means
updates, data initialisation and dead-code replacement; inference is unchanged by all of it."""
from __future__ import annotations

import pytest
import torch

from pysonic.nn.rvq import ResidualVectorQuantizer


def _rvq(n_q=2, bins=8, dim=4, seed=0, **ema):
    torch.manual_seed(seed)
    q = ResidualVectorQuantizer(dim=dim, n_q=n_q, bins=bins)
    if ema is not None:
        q.enable_ema(**ema)
    return q


def test_inference_unchanged_by_training_state():
    torch.manual_seed(0)
    plain = ResidualVectorQuantizer(dim=4, n_q=3, bins=8)
    trained = ResidualVectorQuantizer(dim=4, n_q=3, bins=8)
    trained.load_state_dict(plain.state_dict())
    trained.enable_ema()
    assert set(plain.state_dict()) == {"codebooks"}  # an inference model has no EMA buffers
    x = torch.randn(2, 4, 11)
    assert torch.equal(trained.encode(x), plain.encode(x))
    codes = plain.encode(x)
    assert torch.equal(trained.decode(codes), plain.decode(codes))
    trained.eval()  # eval-mode forward: the same codes and their decoding, no state change
    before = trained.codebooks.clone()
    out = trained(x, n_q=2)
    assert torch.equal(out.codes, plain.encode(x, n_q=2)) and torch.equal(out.quantized, plain.decode(codes[:, :2]))
    assert float(out.commit_loss) == 0 and torch.equal(trained.codebooks, before)


def test_training_needs_enable_ema():
    q = ResidualVectorQuantizer(dim=4, n_q=1, bins=8).train()
    with pytest.raises(RuntimeError, match="enable_ema"):
        q(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="decay"):
        q.enable_ema(decay=1.0)


def test_straight_through_and_commitment_gradient():
    q = _rvq(n_q=2, dead_code_threshold=0.0, data_init=False).train()
    books = q.codebooks.clone()
    x = torch.randn(2, 4, 5, requires_grad=True)
    out = q(x)
    # straight-through: d quantized / d x is the identity
    (g,) = torch.autograd.grad(out.quantized.sum(), x, retain_graph=True)
    torch.testing.assert_close(g, torch.ones_like(x))
    # commitment = mean over levels of mean ||level input - its code||^2, the codes taken from
    # the codebooks before this step's update; gradient to x only
    flat = x.detach().transpose(1, 2).reshape(-1, 4)
    codes = out.codes.transpose(1, 2).reshape(-1, 2)
    c0, c1 = books[0][codes[:, 0]], books[1][codes[:, 1]]
    xv = x.transpose(1, 2).reshape(-1, 4)
    expected = ((xv - c0).pow(2).mean() + (xv - c0 - c1).pow(2).mean()) / 2
    torch.testing.assert_close(out.commit_loss, expected, rtol=1e-6, atol=1e-7)
    (g1,) = torch.autograd.grad(out.commit_loss, x)
    (g2,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(g1, g2)
    # the forward's quantized value is the codes' decoding
    torch.testing.assert_close(out.quantized.detach(), (c0 + c1).view(2, 5, 4).transpose(1, 2), rtol=0, atol=1e-6)
    assert flat.shape == (10, 4)


def test_ema_update_formula():
    decay, eps, K = 0.9, 1e-5, 8
    q = _rvq(n_q=1, bins=K, decay=decay, epsilon=eps, dead_code_threshold=0.0, data_init=False).train()
    books = q.codebooks[0].clone()
    x = torch.randn(3, 4, 7)
    out = q(x)
    idx = out.codes.reshape(-1)
    vecs = x.transpose(1, 2).reshape(-1, 4)
    counts = torch.bincount(idx, minlength=K).float()
    sums = torch.zeros(K, 4).index_add_(0, idx, vecs)
    size = decay * torch.ones(K) + (1 - decay) * counts  # counts start at one use per code
    acc = decay * books + (1 - decay) * sums
    n = size.sum()
    expected = acc / ((size + eps) / (n + K * eps) * n)[:, None]
    torch.testing.assert_close(q.codebooks[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.cluster_size[0], size)
    # a code used a lot moves towards the mean of its vectors
    top = int(counts.argmax())
    mean = sums[top] / counts[top]
    assert (q.codebooks[0][top] - mean).norm() < (books[top] - mean).norm()


def test_data_init_and_dead_code_replacement():
    q = _rvq(n_q=2, bins=16, dead_code_threshold=1.0).train()
    x = 5.0 + torch.randn(2, 4, 40)  # far from the random initial codebooks
    q(x)
    assert bool(q.data_initialized.all())
    vecs = x.transpose(1, 2).reshape(-1, 4)
    # level 0's codes were drawn from the batch, so they lie near the data
    assert q.codebooks[0].mean() > 3.0
    # codes nothing maps to decay below the threshold and are replaced by batch vectors
    q.codebooks[0, 3] = -100.0  # unreachable
    q.cluster_size[0, 3] = 0.5
    out = q(x)
    assert out.stats["dead_codes_replaced"] >= 1
    assert (q.codebooks[0, 3] > -50).all()
    assert float(q.cluster_size[0, 3]) == 1.0  # restarts at the threshold
    dists = (vecs - q.codebooks[0, 3]).norm(dim=1)
    assert float(dists.min()) < 1e-5  # it is one of the batch's vectors


def test_training_reduces_quantisation_error():
    # EMA k-means on a fixed set of clustered vectors: the commitment error falls
    torch.manual_seed(1)
    centres = 3 * torch.randn(6, 4)
    x = (centres[torch.randint(0, 6, (200,))] + 0.05 * torch.randn(200, 4)).T.unsqueeze(0)  # [1, 4, 200]
    q = _rvq(n_q=1, bins=8, dead_code_threshold=1.0, decay=0.8).train()
    first = float(q(x).commit_loss)
    for _ in range(20):
        last = float(q(x).commit_loss)
    assert last < 0.2 * first, (first, last)
