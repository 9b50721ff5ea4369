"""Meta-RL: task distributions (``envs``), the vectorised samplers (episodes; RL^2 trials) and the
agents (MAML-TRPO, RL^2, PEARL).

>>> import fastmeta.rl as rl
>>> dist = rl.make("nav2d")
>>> tasks = dist.sample_tasks(4, seed=0)
"""

from fastmeta.rl.envs import TaskDistribution, make
from fastmeta.rl.sampler import Rollout, sample
from fastmeta.rl.categorical import CategoricalMLPPolicy
from fastmeta.rl.maml_trpo import MAMLTRPO
from fastmeta.rl.pearl import PEARL
from fastmeta.rl.policy import GaussianMLPPolicy
from fastmeta.rl.ppo import PPOConfig
from fastmeta.rl.recurrent import GRUPolicy
from fastmeta.rl.recurrent_snail import SNAILPolicy
from fastmeta.rl.rl2 import RL2
from fastmeta.rl.trials import TrialRollout, sample_trials

__all__ = ["CategoricalMLPPolicy", "GRUPolicy", "GaussianMLPPolicy", "MAMLTRPO", "PEARL", "PPOConfig", "RL2", "Rollout",
           "SNAILPolicy", "TaskDistribution", "TrialRollout", "make", "sample", "sample_trials"]
