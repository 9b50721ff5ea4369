"""Meta-RL task distributions, stepped as T tasks x E episodes (contract: ``base.py``).

``make(name, **kw)`` builds one by registry name:

| name | class | keyword arguments |
|---|---|---|
| ``nav2d`` | :class:`Navigation2D` | ``horizon=100, goal_box=0.01`` |
| ``cheetah-vel`` / ``cheetah-dir`` | :class:`HalfCheetahTasks` | ``horizon=100, action_scale=1`` |
| ``bandit-k{K}-n{N}`` (e.g. ``bandit-k5-n10``) | :class:`BernoulliBandit` | -- |
| ``tabular-mdp`` | :class:`TabularMDP` | ``states=10, actions=5, horizon=10`` |
| ``point-sparse`` | :class:`PointRobotSparse` | ``horizon=20, goal_radius=0.2`` |
"""

from __future__ import annotations

import re

from .bandit import BernoulliBandit
from .base import TaskDistribution
from .cheetah import HalfCheetahTasks
from .navigation import Navigation2D
from .point_sparse import PointRobotSparse
from .tabular import TabularMDP

__all__ = ["BernoulliBandit", "HalfCheetahTasks", "Navigation2D", "PointRobotSparse", "TabularMDP",
           "TaskDistribution", "KNOWN", "make"]

KNOWN = ("nav2d", "cheetah-vel", "cheetah-dir", "bandit-k{K}-n{N}", "tabular-mdp", "point-sparse")
_BANDIT = re.compile(r"bandit-k(\d+)-n(\d+)")


def make(name: str, **kw) -> TaskDistribution:
    """Build the task distribution registered as ``name`` (table in the module docstring).

    Raises ValueError for an unknown name (listing the known ones) and TypeError for a
    keyword the distribution does not take.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name == "nav2d":
        return Navigation2D(**kw)
    if name in ("cheetah-vel", "cheetah-dir"):
        return HalfCheetahTasks(kind=name.split("-")[1], **kw)
    if name == "tabular-mdp":
        return TabularMDP(**kw)
    if name == "point-sparse":
        return PointRobotSparse(**kw)
    m = _BANDIT.fullmatch(name)
    if m:
        if kw:
            raise TypeError(f"{name}: takes no keyword arguments (arms and pulls are in the "
                            f"name), got {sorted(kw)}")
        return BernoulliBandit(arms=int(m.group(1)), pulls=int(m.group(2)))
    raise ValueError(f"unknown task distribution {name!r}; known: {', '.join(KNOWN)}")
