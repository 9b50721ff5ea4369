"""RL^2: the batched trial sampler (state carried across episodes, reset per trial, packed
steps), the GRU/SNAIL policies (step-by-step == whole trial), PPO against a float64 per-trial
loop, GAE across episode boundaries, bad input."""

import pytest
import torch

import fastmeta.rl as rl
from fastmeta.rl.envs import BernoulliBandit, Navigation2D, TabularMDP
from fastmeta.rl.ppo import PPO, PPOConfig, advantages, ppo_loss
from fastmeta.rl.recurrent import GRUPolicy, trial_inputs
from fastmeta.rl.recurrent_snail import SNAILPolicy
from fastmeta.rl.rl2 import RL2
from fastmeta.rl.trials import sample_trials

try:
    import gymnasium
    import mujoco  # noqa: F401
except ImportError:  # the rl extra is missing: the torch-only distributions are still tested
    gymnasium = None


def gru_for(dist, hidden=16, **kw):
    return GRUPolicy(dist.obs_dim, dist.act_dim, dist.discrete, hidden=hidden, **kw)


def snail_for(dist, episodes, channels=8):
    return SNAILPolicy(dist.obs_dim, dist.act_dim, dist.discrete, seq_len=episodes * dist.horizon,
                       channels=channels)


def rollout(dist, policy, T=3, E=2, n=3, seed=0, **kw):
    tasks = dist.sample_tasks(T, seed=seed)
    return sample_trials(dist, policy, tasks, E, n, seed=seed + 1,
                         generator=torch.Generator().manual_seed(seed), **kw)


def test_hidden_state_carried_across_episodes_and_reset_between_trials():
    dist = TabularMDP(states=4, actions=3, horizon=5)
    policy = gru_for(dist)
    ro = rollout(dist, policy, T=3, E=2, n=3, keep_states=True)
    L = 3 * 5
    assert ro.states.shape == (3, 2, L, 16)
    # every trial starts from a fresh (zero) state ...
    assert torch.equal(ro.states[:, :, 0], torch.zeros(3, 2, 16))
    # ... and the state before step l is the GRU's state after the trial's first l steps, episode
    # boundaries included: the first step of episodes 2 and 3 (l = 5, 10) sees the state the
    # previous episode left, not a reset
    f = ro.flat_trials()
    x = trial_inputs(f["obs"], f["actions"], f["rewards"], f["done"], dist.act_dim, True)
    with torch.no_grad():
        h_seq, _ = policy.gru(x)
    torch.testing.assert_close(ro.states.reshape(6, L, 16)[:, 1:], h_seq[:, :-1], rtol=1e-5,
                               atol=1e-6)
    for l in (5, 10):
        assert (ro.states[:, :, l].abs().sum(-1) > 0.1).all()
        assert (ro.done.reshape(6, L)[:, l - 1]).all()  # the previous step ended an episode
    # a second call starts fresh trials again
    again = rollout(dist, policy, T=3, E=2, n=3, seed=5, keep_states=True)
    assert torch.equal(again.states[:, :, 0], torch.zeros(3, 2, 16))


def test_packed_layout_done_flags_and_episode_returns():
    dist = Navigation2D(goal_box=0.05)  # episodes end early at different steps
    torch.manual_seed(0)
    policy = gru_for(dist, init_std=0.05)
    with torch.no_grad():
        policy.pi.bias.fill_(0.05)  # drift up-right: some goals are reached early
    ro = rollout(dist, policy, T=6, E=2, n=2)
    m = ro.mask.reshape(12, -1)
    lengths = m.sum(1).long()
    assert (lengths < 200).any() and (lengths <= 200).all()
    # real steps are a prefix of every row, padding after
    assert torch.equal(m, (torch.arange(m.shape[1]) < lengths[:, None]).float())
    done = ro.done.reshape(12, -1)
    assert torch.equal(done.sum(1), torch.full((12,), 2))  # one end per episode
    assert torch.equal(done[torch.arange(12), lengths - 1], torch.ones(12, dtype=torch.bool))
    ep = ro.episode.reshape(12, -1)
    assert (ep[:, 1:] >= ep[:, :-1]).all() and (ep[m == 0] == 2).all()
    torch.testing.assert_close(ro.episode_returns().sum(-1), ro.returns())
    moved = ro.to("cpu")
    assert moved.episodes == 2 and torch.equal(moved.episode, ro.episode) and moved.states is None
    assert (ro.rewards[ro.mask == 0] == 0).all() and (ro.obs[ro.mask == 0] == 0).all()


@pytest.mark.parametrize("kind", ["gru", "snail"])
def test_step_by_step_rollout_equals_the_whole_trial_pass(kind):
    """What PPO recomputes from the stored trial (one forward over the packed sequence) is what
    the rollout acted on: deterministic actions are the argmax / mean of forward's output."""
    for dist, n in ((TabularMDP(states=4, actions=3, horizon=4), 3), (Navigation2D(horizon=6,
                                                                                   goal_box=0.05),
                                                                      2)):
        policy = gru_for(dist) if kind == "gru" else snail_for(dist, n)
        ro = rollout(dist, policy, T=3, E=1, n=n, deterministic=True)
        f = ro.flat_trials()
        x = trial_inputs(f["obs"], f["actions"], f["rewards"], f["done"], dist.act_dim,
                         dist.discrete)
        with torch.no_grad():
            out, value = policy(x)
        real = f["mask"].bool()
        assert value.shape == f["mask"].shape
        if dist.discrete:
            assert torch.equal(out.argmax(-1)[real], f["actions"][real])
        else:
            torch.testing.assert_close(out[..., :2][real], f["actions"][real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gru", "snail"])
def test_policy_step_with_ragged_positions_equals_forward(kind):
    """Trials advance at different wall-clock steps (``alive`` varies); each trial's outputs at
    its own positions equal ``forward`` over its packed sequence (SNAIL: the block caches)."""
    torch.manual_seed(0)
    N, L, obs_dim, A = 3, 9, 2, 2
    policy = (GRUPolicy(obs_dim, A, False, hidden=8) if kind == "gru"
              else SNAILPolicy(obs_dim, A, False, seq_len=L, channels=4)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, L, policy.in_dim, generator=g, dtype=torch.float64)
    state, pos = policy.initial_state(N), torch.zeros(N, dtype=torch.long)
    got = torch.zeros(N, L, 2 * A, dtype=torch.float64)
    with torch.no_grad():
        while bool((pos < L).any()):
            alive = (torch.rand(N, generator=g) < 0.6) & (pos < L)
            rows = torch.arange(N)[alive]
            out, state = policy.step(x[torch.arange(N), pos.clamp(max=L - 1)], state, pos, alive)
            got[rows, pos[alive]] = out[alive]
            pos += alive.long()
        want, _ = policy(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gru_action_reward_input_and_separate_value_gru():
    """``action_reward``: the GRU reads ``x`` plus ``onehot(a_prev) * r_prev``; ``value_gru``:
    the value comes from a second GRU, so the value loss leaves the policy's GRU alone. Step by
    step (ragged) equals the whole-trial pass, the state holding both GRUs' hidden vectors."""
    torch.manual_seed(0)
    N, L, A = 3, 7, 4
    dist = BernoulliBandit(arms=A, pulls=L)
    policy = gru_for(dist, hidden=6, action_reward=True, value_gru=True).double()
    ro = rollout(dist, policy.float(), T=N, E=1, n=1)
    policy.double()
    f = ro.flat_trials()
    x = trial_inputs(f["obs"], f["actions"], f["rewards"], f["done"], A, True).double()
    # the extra inputs, written out: the previous reward in the previous action's slot
    extra = torch.zeros(N, L, A, dtype=torch.float64)
    for i in range(N):
        for l in range(1, L):
            extra[i, l, f["actions"][i, l - 1]] = f["rewards"][i, l - 1]
    torch.testing.assert_close(policy._gru_inputs(x), torch.cat([x, extra], -1))
    out, value = policy(x)
    with torch.no_grad():
        torch.testing.assert_close(value, policy.v(policy.vgru(torch.cat([x, extra], -1))[0])
                                   .squeeze(-1))
    g = torch.Generator().manual_seed(1)
    state, pos = policy.initial_state(N), torch.zeros(N, dtype=torch.long)
    assert state.shape == (N, 12)
    got = torch.zeros(N, L, A, dtype=torch.float64)
    with torch.no_grad():
        while bool((pos < L).any()):
            alive = (torch.rand(N, generator=g) < 0.6) & (pos < L)
            o, state = policy.step(x[torch.arange(N), pos.clamp(max=L - 1)], state, pos, alive)
            got[torch.arange(N)[alive], pos[alive]] = o[alive]
            pos += alive.long()
    torch.testing.assert_close(got, out.detach(), rtol=1e-10, atol=1e-12)
    value.pow(2).sum().backward()
    assert all(p.grad is None for n, p in policy.named_parameters() if n.startswith("gru."))
    assert all(p.grad is not None for n, p in policy.named_parameters() if n.startswith("vgru."))
    with pytest.raises(ValueError, match="action_reward needs a discrete"):
        GRUPolicy(2, 2, False, hidden=4, action_reward=True)


def test_greedy_bandit_baselines():
    """Arms that pay 0 or 1 for sure: ``prior=False`` pulls every arm once, then stays on a
    paying arm; ``prior=True`` (posterior means) stays on the first paying arm it finds."""
    from fastmeta.rl.envs.bandit import greedy_returns

    dist = BernoulliBandit(arms=4, pulls=10)
    probs = torch.tensor([[0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1.]])
    tasks = {"probs": probs}
    got = greedy_returns(dist, tasks, 0, torch.Generator().manual_seed(0))
    assert got.tolist() == [1 + 6, 2 + 6, 0, 3 + 6]
    for s in range(5):
        got = greedy_returns(dist, tasks, s, torch.Generator().manual_seed(s), prior=True)
        assert got[2] == 0 and ((got[[0, 1, 3]] >= 10 - 3) & (got[[0, 1, 3]] <= 10)).all(), got
    # k = 10 arms, n = 100 pulls: near the RL^2 paper's greedy row (77.1), far above random (50)
    dist = rl.make("bandit-k10-n100")
    tasks = dist.sample_tasks(500, 0)  # (a tie generator seeded 0 would draw these very probs)
    for prior in (False, True):
        mean = float(greedy_returns(dist, tasks, 1, torch.Generator().manual_seed(7), prior).mean())
        assert 74 < mean < 85, (prior, mean)
    with pytest.raises(TypeError, match="BernoulliBandit"):
        greedy_returns(TabularMDP(), {}, 0)


def test_batched_rollout_equals_one_task_at_a_time():
    dist = Navigation2D(goal_box=0.05)
    torch.manual_seed(1)
    policy = gru_for(dist, init_std=0.05).double()
    with torch.no_grad():
        policy.pi.bias.fill_(0.04)
    tasks = dist.sample_tasks(4, seed=3)
    both = sample_trials(dist, policy, tasks, 2, 2, seed=7, deterministic=True)
    assert (both.mask.sum(-1) < 200).any()  # some episodes ended early
    for t in range(4):
        one = sample_trials(dist, policy, {"goal": tasks["goal"][t:t + 1]}, 2, 2, seed=7,
                            deterministic=True)
        for key in ("obs", "actions", "rewards", "mask", "done", "episode"):
            a, b = getattr(both, key)[t:t + 1], getattr(one, key)
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)
            else:
                assert torch.equal(a, b), key


@pytest.mark.skipif(gymnasium is None, reason="needs gymnasium + mujoco (rl extra)")
def test_cheetah_trials_through_the_vector_env():
    dist = rl.make("cheetah-vel", horizon=5)
    try:
        ro = rollout(dist, gru_for(dist, init_std=0.3), T=2, E=2, n=2, keep_states=True)
    finally:
        dist.close()
    assert ro.obs.shape == (2, 2, 10, 17) and ro.actions.shape == (2, 2, 10, 6)
    assert bool(ro.mask.all()) and torch.equal(ro.done.sum(-1), torch.full((2, 2), 2))
    assert (ro.states[:, :, 5].abs().sum(-1) > 0).all()  # carried into episode 2


def test_sampling_is_reproducible():
    dist = BernoulliBandit(arms=3, pulls=6)
    policy = gru_for(dist)
    a, b = rollout(dist, policy, seed=2), rollout(dist, policy, seed=2)
    for key in ("actions", "rewards", "mask"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert not torch.equal(a.actions, rollout(dist, policy, seed=3).actions)


def _per_trial_ppo_loss(policy, x, actions, mask, logp_old, adv, ret, cfg):
    """The PPO loss written out step by step, one trial at a time (float64 oracle)."""
    total_pi, total_v, total_h, count = 0.0, 0.0, 0.0, 0.0
    for i in range(x.shape[0]):
        L = int(mask[i].sum())
        out, value = policy(x[i:i + 1, :L])
        for l in range(L):
            logits = out[0, l]
            logp = torch.log_softmax(logits, -1)[actions[i, l]]
            ratio = torch.exp(logp - logp_old[i, l])
            a = adv[i, l]
            total_pi = total_pi - torch.minimum(ratio * a, torch.clamp(ratio, 1 - cfg.clip,
                                                                       1 + cfg.clip) * a)
            total_v = total_v + (value[0, l] - ret[i, l]) ** 2
            p = torch.softmax(logits, -1)
            total_h = total_h - (p * torch.log(p)).sum()
            count += 1
    return (total_pi + cfg.value_coef * total_v - cfg.entropy_coef * total_h) / count


@pytest.mark.parametrize("kind", ["gru", "gru-options", "snail"])
def test_ppo_loss_and_gradients_match_a_float64_per_trial_loop(kind):
    dist = TabularMDP(states=3, actions=3, horizon=4)
    torch.manual_seed(0)
    policy = (gru_for(dist, hidden=8) if kind == "gru"
              else gru_for(dist, hidden=8, action_reward=True, value_gru=True)
              if kind == "gru-options" else snail_for(dist, 2, channels=4)).double()
    ro = rollout(dist, policy, T=3, E=2, n=2)
    f = ro.flat_trials()
    x = trial_inputs(f["obs"], f["actions"], f["rewards"], f["done"], 3, True).double()
    mask = f["mask"].double()
    mask[0, 5:] = 0  # a shorter trial: padding must not count
    cfg = PPOConfig(clip=0.1, entropy_coef=0.05)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out, values = policy(x)
        logp_old = policy.log_prob(out, f["actions"]) + 0.3 * torch.randn(mask.shape, generator=g,
                                                                          dtype=torch.float64)
        adv, ret = advantages(f["rewards"].double() * mask, values, mask, 0.9, 0.5)
    loss, stats = ppo_loss(policy, x, f["actions"], mask, logp_old, adv, ret, cfg)
    grads = torch.autograd.grad(loss, list(policy.parameters()))
    ref = _per_trial_ppo_loss(policy, x, f["actions"], mask, logp_old, adv, ret, cfg)
    ref_grads = torch.autograd.grad(ref, list(policy.parameters()))
    assert 0 < float(stats["clip_frac"]) < 1  # both branches of the clipped objective are exercised
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gae_runs_across_episode_boundaries():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.float64)
    mask[1, 4:] = 0
    adv, ret = advantages(rewards * mask, values, mask, 0.9, 0.7)
    raw = []
    for i in range(2):
        L, a, out = int(mask[i].sum()), 0.0, torch.zeros(6, dtype=torch.float64)
        for l in reversed(range(L)):
            v_next = values[i, l + 1] if l + 1 < L else 0.0
            a = rewards[i, l] + 0.9 * v_next - values[i, l] + 0.9 * 0.7 * a
            out[l] = a
        raw.append(out)
    raw = torch.stack(raw)
    torch.testing.assert_close(ret, (raw + values) * mask)
    real = raw[mask.bool()]
    torch.testing.assert_close(adv[mask.bool()],
                               (real - real.mean()) / (real.std(unbiased=False) + 1e-8))


def test_ppo_update_improves_its_objective_and_agent_state_holds_adam():
    dist = BernoulliBandit(arms=3, pulls=5)
    torch.manual_seed(0)
    agent = RL2(gru_for(dist), PPOConfig(lr=3e-3, epochs=2, minibatches=2))
    ro = agent.rollout(dist, dist.sample_tasks(8, seed=0), 1, 1, seed=0)
    m = agent.step(ro, torch.Generator().manual_seed(0))
    assert {"return", "episode_1", "pi_loss", "v_loss", "entropy", "approx_kl",
            "clip_frac"} <= set(m)
    assert m["return"] == pytest.approx(float(ro.returns().mean()))
    sd = agent.state_dict()
    # Adam moments are saved
    assert "_extra_state" in sd and sd["_extra_state"]["optimizer"]["state"]
    clone = RL2(gru_for(dist), PPOConfig(lr=3e-3, epochs=2, minibatches=2))
    clone.load_state_dict(sd)
    s0, s1 = agent.ppo.optimizer.state_dict()["state"], clone.ppo.optimizer.state_dict()["state"]
    assert all(torch.equal(s0[k]["exp_avg"], s1[k]["exp_avg"]) for k in s0)


class NaNBandit(BernoulliBandit):
    def _step(self, actions):
        obs, reward, done, info = super()._step(actions)
        if self._t == 2:
            reward = reward.clone()
            reward[1, 0] = float("nan")
        return obs, reward, done, info


def test_bad_input_errors():
    dist = BernoulliBandit(arms=3, pulls=5)
    policy = gru_for(dist)
    tasks = dist.sample_tasks(2, seed=0)
    with pytest.raises(ValueError, match=r"reward has NaN or inf at step 2 \(task 1, episode 0"):
        sample_trials(NaNBandit(arms=3, pulls=5), policy, tasks, 1, 1, seed=0)
    with pytest.raises(ValueError, match="does not fit tabular-mdp"):
        sample_trials(TabularMDP(), policy, TabularMDP().sample_tasks(2, 0), 1, 1, seed=0)
    with pytest.raises(TypeError, match="policy must be a fastmeta.rl.recurrent.SequencePolicy"):
        sample_trials(dist, lambda obs: obs, tasks, 1, 1, seed=0)
    with pytest.raises(ValueError, match="episodes must be >= 1, got 0"):
        sample_trials(dist, policy, tasks, 1, 0, seed=0)
    with pytest.raises(TypeError, match="trials must be an int"):
        sample_trials(dist, policy, tasks, 1.5, 1, seed=0)
    with pytest.raises(ValueError, match=r"tasks\['probs'\] must have shape"):
        sample_trials(dist, policy, {"probs": torch.rand(2, 4)}, 1, 1, seed=0)
    with pytest.raises(ValueError, match="last dim in_dim = obs_dim \\+ act_dim \\+ 2 = 6"):
        policy(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="more than seq_len = 10"):
        snail_for(dist, 2)(torch.zeros(1, 11, 6))
    with pytest.raises(ValueError, match="PPOConfig.epochs must be an int >= 1, got 0"):
        PPOConfig(epochs=0)
    with pytest.raises(ValueError, match=r"PPOConfig.lam must be in \[0, 1\], got 1.5"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match="minibatches \\(4\\) must be <= the number of trials "
                       "\\(2\\)"):
        PPO(policy).update(torch.zeros(2, 5, 6), torch.zeros(2, 5, dtype=torch.long),
                           torch.zeros(2, 5), torch.ones(2, 5))
    with pytest.raises(ValueError, match="rewards has a non-finite value"):
        advantages(torch.tensor([[1.0, float("nan")]]), torch.zeros(1, 2), torch.ones(1, 2), 0.9,
                   0.9)
    with pytest.raises(ValueError, match="hidden must be|feature_dim must be a positive int"):
        GRUPolicy(1, 3, True, hidden=0)
    with pytest.raises(TypeError, match="policy must be a fastmeta.rl.recurrent.SequencePolicy"):
        RL2(torch.nn.Linear(2, 2))


def test_public_names():
    assert rl.RL2 is RL2 and rl.sample_trials is sample_trials and rl.GRUPolicy is GRUPolicy
