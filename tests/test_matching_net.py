"""MatchingNet learner (with and without full context embeddings) and its training CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from learner_helpers import blob_dataset

from fastmeta import cli, data
from fastmeta.learners import MatchingNet
from fastmeta.nn import Conv4

DIM = 16  # Conv4(hidden=16, blocks=3) on 12x12 blobs -> 16 x 1 x 1


def eager_log_probs(query, support, support_labels, n_way, scale=1.0):
    """The eager Matching Networks head (normalise, bmm, softmax, bmm with one-hot, log),
    written in log space so it stays finite: the oracle for the learner's fused head."""
    sim = scale * torch.bmm(F.normalize(query, dim=-1, eps=1e-8),
                            F.normalize(support, dim=-1, eps=1e-8).transpose(1, 2))  # [B,Q,S]
    onehot = F.one_hot(support_labels.long(), n_way).to(sim.dtype)  # [B,S,N]
    masked = sim.unsqueeze(-1) + torch.log(onehot).unsqueeze(1)  # [B,Q,S,N], -inf off-class
    return torch.logsumexp(masked, 2) - torch.logsumexp(sim, 2, keepdim=True)


def eager_loss(query, support, support_labels, n_way, query_labels, scale=1.0, reduction="mean"):
    logp = eager_log_probs(query, support, support_labels, n_way, scale)
    loss = F.nll_loss(logp.flatten(0, 1), query_labels.flatten().long(), reduction=reduction)
    correct = (logp.detach().argmax(-1) == query_labels).to(logp.dtype)
    if reduction == "none":
        return loss.view(query_labels.shape), correct
    return loss, correct.mean()


def small(fce=False, **kw):
    return MatchingNet(Conv4(1, hidden=DIM, blocks=3), fce=fce, embed_dim=DIM if fce else None, **kw)


def batch(ways=5, shots=2, queries=3, b=4, seed=0, split="train"):
    sx, sy, qx, qy, _ = next(iter(data.episodes(blob_dataset(), split, ways, shots, queries,
                                                batch_size=b, num_batches=1, seed=seed)))
    return sx, sy, qx, qy


@pytest.mark.parametrize("fce", [False, True])
def test_forward_shapes(fce):
    torch.manual_seed(0)
    sx, sy, qx, qy = batch()
    learner = small(fce)
    loss, acc = learner(sx, sy, qx, qy)
    assert loss.dim() == 0 and torch.isfinite(loss) and 0 <= float(acc) <= 1
    rows, correct = learner(sx, sy, qx, qy, reduction="none")
    assert rows.shape == (4, 15) and correct.shape == (4, 15)
    assert torch.allclose(rows.mean(), loss, atol=1e-5)
    logp = learner.log_probs(sx, sy, qx)
    assert logp.shape == (4, 15, 5) and torch.allclose(logp.exp().sum(-1), torch.ones(4, 15), atol=1e-4)
    assert learner.episode_accuracy(sx, sy, qx, qy).shape == (4,)
    loss.backward()
    grads = [p.grad for p in learner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if fce:  # both context LSTMs are trained
        assert learner.g.lstm.weight_hh_l0_reverse.grad.abs().sum() > 0
        assert learner.f.cell.weight_ih.grad.abs().sum() > 0


@pytest.mark.parametrize("fce", [False, True])
def test_head_matches_eager_head(fce):
    """The learner's head is exactly Vinyals et al. eq. 1-2 on its embeddings."""
    torch.manual_seed(0)
    sx, sy, qx, qy = batch()
    learner = small(fce, scale=7.0).eval()
    zs, zq = learner.embed(sx, qx)
    want = eager_loss(zq, zs, sy, 5, qy, 7.0, "none")[0]
    got = learner(sx, sy, qx, qy, reduction="none")[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(learner.log_probs(sx, sy, qx), eager_log_probs(zq, zs, sy, 5, 7.0),
                               rtol=1e-4, atol=1e-5)


def test_fce_changes_embeddings_and_uses_context():
    torch.manual_seed(0)
    sx, sy, qx, qy = batch()
    learner = small(True).eval()
    plain_s = learner.backbone(sx.flatten(0, 1)).view(4, 10, -1)
    zs, zq = learner.embed(sx, qx)
    assert zs.shape == (4, 10, DIM) and zq.shape == (4, 15, DIM)
    assert not torch.allclose(zs, plain_s)
    # f(query) depends on the episode's support set: swap the support sets of two episodes
    _, zq_swapped = learner.embed(sx[[1, 0, 2, 3]], qx)
    assert not torch.allclose(zq_swapped[0], zq[0])
    torch.testing.assert_close(zq_swapped[2:], zq[2:])  # episodes stay independent


def test_support_permutation_invariance_without_fce():
    torch.manual_seed(0)
    sx, sy, qx, qy = batch()
    learner = small(False).eval()  # eval: BatchNorm statistics do not depend on the order
    perm = torch.randperm(sx.shape[1])
    a = learner.log_probs(sx, sy, qx, n_way=5)
    b = learner.log_probs(sx[:, perm], sy[:, perm], qx, n_way=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    la, ca = learner(sx, sy, qx, qy, reduction="none")
    lb, cb = learner(sx[:, perm], sy[:, perm], qx, qy, reduction="none")
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert torch.equal(ca, cb)


@pytest.mark.parametrize("fce", [False, True])
def test_short_training_run_learns(fce):
    torch.manual_seed(0)
    ds = blob_dataset()
    learner = small(fce)
    opt = torch.optim.Adam(learner.parameters(), 3e-3)
    losses = []
    for sx, sy, qx, qy, _ in data.episodes(ds, "train", 5, 1, 5, batch_size=4, num_batches=30):
        loss, _ = learner(sx, sy, qx, qy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])
    test = data.episodes(ds, "test", 5, 1, 5, batch_size=10, num_batches=10, seed=1)
    res = learner.evaluate(test, episodes=100)
    assert res.episodes == 100 and res.accuracy > 0.4, res  # chance is 0.2
    assert 0 < res.ci95 < 0.1


def test_bad_inputs():
    sx, sy, qx, qy = batch()
    learner = small(False)
    with pytest.raises(ValueError, match="fce=True needs embed_dim"):
        MatchingNet(Conv4(1), fce=True)
    with pytest.raises(ValueError, match="scale must be > 0"):
        MatchingNet(Conv4(1), scale=0.0)
    with pytest.raises(ValueError, match="fce_steps"):
        MatchingNet(Conv4(1), fce=True, embed_dim=64, fce_steps=0)
    with pytest.raises(ValueError, match="same B"):
        learner(sx, sy, qx[:2], qy[:2])
    with pytest.raises(ValueError, match="support_y must have shape"):
        learner(sx, sy[:, :3], qx, qy)
    with pytest.raises(ValueError, match="query_y must have shape"):
        learner(sx, sy, qx, qy[:, :2])
    with pytest.raises(TypeError, match="support_y must be an integer tensor"):
        learner(sx, sy.float(), qx, qy)
    with pytest.raises(ValueError, match="at least one support"):
        learner(sx[:, :0], sy[:, :0], qx, qy, n_way=5)
    with pytest.raises(ValueError, match="n_way must be >= 1"):
        learner(sx, sy, qx, qy, n_way=0)
    with pytest.raises(ValueError, match="embed_dim"):  # backbone width != FCE width
        MatchingNet(Conv4(1, hidden=DIM, blocks=3), fce=True, embed_dim=DIM + 1)(sx, sy, qx, qy)
    with pytest.raises(ValueError, match="support_labels"):  # labels out of range (the op checks)
        learner(sx, sy, qx, qy, n_way=3)


@pytest.mark.parametrize("fce", [False, True])
def test_cli_trains_evaluates_and_resumes(tmp_path, monkeypatch, fce):
    ds = blob_dataset(size=16)  # the full Conv4 needs >= 16 pixels
    monkeypatch.setattr(data, "load_dataset", lambda name, root=None: ds)
    run = tmp_path / "run"
    base = ["train", "matching", "--dataset", "glyphs", "--ways", "5", "--shots", "1", "--queries", "3",
            "--batch", "2", "--val-every", "4", "--val-episodes", "8", "--test-episodes", "20",
            "--ckpt-every", "4", "--run-dir", str(run), "--no-progress", *(["--fce"] if fce else [])]
    assert cli.main(base + ["--steps", "8"]) == 0
    out = json.loads((run / "results.json").read_text())
    assert out["learner"] == "matching" and out["steps"] == 8 and out["test_episodes"] == 20
    assert (run / "learning_curve.png").stat().st_size > 1000
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("g.lstm") for k in json.dumps(list(_state_keys(ckpt))).split('"')) == fce
    assert cli.main(base + ["--steps", "12", "--resume"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 12


def _state_keys(ckpt):
    for v in ckpt.values():
        if isinstance(v, dict) and any(isinstance(k, str) and k.startswith("backbone.") for k in v):
            return v.keys()
    return []
