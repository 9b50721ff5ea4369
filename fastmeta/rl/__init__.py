"""Meta-RL: task distributions (``envs``) and the vectorised sampler.

>>> import fastmeta.rl as rl
>>> dist = rl.make("nav2d")
>>> tasks = dist.sample_tasks(4, seed=0)
"""

from fastmeta.rl.envs import TaskDistribution, make
from fastmeta.rl.sampler import Rollout, sample
from fastmeta.rl.categorical import CategoricalMLPPolicy
from fastmeta.rl.maml_trpo import MAMLTRPO
from fastmeta.rl.policy import GaussianMLPPolicy

__all__ = ["CategoricalMLPPolicy", "GaussianMLPPolicy", "MAMLTRPO", "Rollout", "TaskDistribution", "make", "sample"]
