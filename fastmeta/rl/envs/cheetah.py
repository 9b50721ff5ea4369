"""HalfCheetahVel and HalfCheetahDir (Finn et al. 2017, section 5.3) on gymnasium's
``HalfCheetah-v5`` (MuJoCo), stepped through one ``gymnasium.vector.SyncVectorEnv``.

* HalfCheetahVel: task ``{"velocity": [T] float32}``, goal velocity ~ U[0, 2];
  reward ``-|v_x - velocity| - 0.05 * ||a||^2``
* HalfCheetahDir: task ``{"direction": [T] float32}``, +1 or -1 with probability 1/2;
  reward ``direction * v_x - 0.05 * ||a||^2``
* ``v_x`` is gymnasium's ``info["x_velocity"]`` (x displacement of the torso over one
  control step / dt); ``a = action / action_scale`` is the action sent to MuJoCo (MuJoCo
  clamps the applied control to the actuators' range [-1, 1]; the cost uses ``a`` before that
  clamp -- rllab's and pytorch-maml-rl's action wrappers clip first, which differs only where
  ``|a| > 1``)
* ``action_scale`` (default 1): the policy acts in units ``action_scale`` times MuJoCo's.
  pytorch-maml-rl's HalfCheetah configs use 10 (its ``normalization_scale``: actions in
  [-10, 10] mapped to [-1, 1]), so that a policy initialised with standard deviation 1 explores
  with torques of standard deviation 0.1
* observation: gymnasium's 17-dim HalfCheetah-v5 observation (joint positions without the
  torso's x, then velocities), float32 ``[T, E, 17]``
* action: ``[T, E, 6]`` float, joint torques
* horizon: 100 steps; every episode is exactly that long

There is one sub-environment per (task, episode), T*E in all. ``reset`` resets every
sub-environment with its own seed drawn from ``seed`` (reproducible initial-state noise;
``last_seeds`` lists them, sub-env ``t * E + e`` first to last) and
starts clean episodes; autoreset is disabled, so no episode ever runs into the next one. The
vector env is built once and reused while T*E is unchanged. Needs ``gymnasium>=1.0`` and
``mujoco`` (the ``rl`` extra).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from .base import TaskDistribution, positive_int, seeded_generator

try:
    import gymnasium
    import mujoco
    from gymnasium.vector import AutoresetMode, SyncVectorEnv
except ImportError as exc:  # reported when a cheetah distribution is built
    gymnasium = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

CTRL_COST = 0.05


def _make_cheetah(horizon: int):
    # MuJoCo >= 3.4 warns (on stderr, once per model load) that gymnasium's half_cheetah.xml
    # uses the deprecated 'settotalmass'; that one is gymnasium's to fix and is dropped here,
    # any other MuJoCo warning is passed on as a Python warning.
    def forward(msg: str) -> None:
        if "settotalmass" not in msg:
            warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2)

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(forward)
    try:
        return gymnasium.make("HalfCheetah-v5", max_episode_steps=horizon,
                              disable_env_checker=True)
    finally:
        mujoco.set_mju_user_warning(previous)


class HalfCheetahTasks(TaskDistribution):
    """HalfCheetahVel (``kind="vel"``) or HalfCheetahDir (``kind="dir"``); see module doc."""

    obs_dim = 17
    act_dim = 6
    discrete = False

    def __init__(self, kind: str = "vel", horizon: int = 100, action_scale: float = 1.0) -> None:
        super().__init__()
        if kind not in ("vel", "dir"):
            raise ValueError(f"kind must be 'vel' or 'dir', got {kind!r}")
        if _IMPORT_ERROR is not None:
            raise ImportError(f"cheetah-{kind} needs gymnasium>=1.0 and mujoco "
                              f"(pip install 'fastmeta[rl]'): {_IMPORT_ERROR}")
        self.kind = kind
        self.name = f"cheetah-{kind}"
        self.horizon = positive_int(horizon, "horizon")
        if (isinstance(action_scale, bool) or not isinstance(action_scale, (int, float))
                or not 0 < action_scale < float("inf")):
            raise ValueError(f"{self.name}: action_scale must be a positive finite number, got "
                             f"{action_scale!r}")
        self.action_scale = float(action_scale)
        self.key = "velocity" if kind == "vel" else "direction"
        self.task_shapes = {self.key: ()}
        self._venv = None
        self.last_seeds: list[int] = []

    def _check_task_values(self, tasks: dict[str, Tensor]) -> None:
        v = tasks[self.key]
        if not v.is_floating_point():
            raise ValueError(f"{self.name}: tasks[{self.key!r}] must be floating point, got "
                             f"{v.dtype}")
        if self.kind == "dir" and not bool((v.abs() == 1).all()):
            raise ValueError(f"{self.name}: tasks['direction'] must be +1 or -1, got values "
                             f"{sorted(set(v.tolist()))[:5]}")

    def _sample_tasks(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        if self.kind == "vel":
            return {"velocity": 2.0 * torch.rand(n, generator=generator, dtype=torch.float32)}
        coin = torch.randint(0, 2, (n,), generator=generator)
        return {"direction": (2 * coin - 1).float()}

    def vector_env(self, num_envs: int):
        """The SyncVectorEnv of ``num_envs`` HalfCheetah-v5 sub-envs (reused when it fits)."""
        if self._venv is None or self._venv.num_envs != num_envs:
            self.close()
            fns = [lambda: _make_cheetah(self.horizon)] * num_envs
            self._venv = SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
        return self._venv

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
            self._venv = None

    def _reset(self, tasks: dict[str, Tensor], episodes: int, seed: int) -> Tensor:
        goal = tasks[self.key].float()
        T = goal.shape[0]
        venv = self.vector_env(T * episodes)
        seeds = torch.randint(0, 2**31 - 1, (T * episodes,), generator=seeded_generator(seed))
        self.last_seeds = seeds.tolist()
        obs, _ = venv.reset(seed=self.last_seeds)
        self._goal = goal[:, None].expand(T, episodes)
        return self._obs(obs, T, episodes)

    @staticmethod
    def _obs(obs: np.ndarray, T: int, E: int) -> Tensor:
        return torch.from_numpy(np.asarray(obs, dtype=np.float32)).view(T, E, -1)

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, dict]:
        T, E = self.T, self.E
        if self.action_scale != 1.0:
            actions = actions / self.action_scale
        a = actions.reshape(T * E, self.act_dim).numpy()
        obs, _, _, _, info = self._venv.step(a)
        vx = torch.from_numpy(np.asarray(info["x_velocity"], dtype=np.float32)).view(T, E)
        ctrl = CTRL_COST * actions.square().sum(-1)
        if self.kind == "vel":
            reward = -(vx - self._goal).abs() - ctrl
        else:
            reward = self._goal * vx - ctrl
        done = torch.zeros(T, E, dtype=torch.bool)
        return self._obs(obs, T, E), reward, done, {"x_velocity": vx}

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn gymnasium down
            pass
