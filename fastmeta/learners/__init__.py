"""Meta-learners built on fastmeta.ops (each calls only public ops)."""

from fastmeta.learners._evaluate import EvalResult, FewShotLearner, confidence_interval
from fastmeta.learners.baselines import PixelNN
from fastmeta.learners.matching import MatchingNet
from fastmeta.learners.protonet import ProtoNet

__all__ = ["EvalResult", "FewShotLearner", "MatchingNet", "PixelNN", "ProtoNet", "confidence_interval"]
