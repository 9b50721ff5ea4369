"""Meta-learners built on fastmeta.ops (each calls only public ops)."""

from fastmeta.learners._evaluate import EvalResult, FewShotLearner, confidence_interval
from fastmeta.learners.baseline import Baseline, cosine_logits, fit_heads
from fastmeta.learners.pixel_nn import PixelNN
from fastmeta.learners.imaml import iMAML
from fastmeta.learners.mann import MANN
from fastmeta.learners._clone import clone_module
from fastmeta.learners.episodic import EpisodicLearner
from fastmeta.learners.maml import ANIL, MAML, MetaLossResult, MetaSGD
from fastmeta.learners.matching import MatchingNet
from fastmeta.learners.metalstm import MetaLSTM
from fastmeta.learners.protonet import ProtoNet
from fastmeta.learners.reptile import Reptile
from fastmeta.learners.snail import SNAIL

__all__ = ["EvalResult", "FewShotLearner", "MANN", "MatchingNet", "MetaLSTM", "PixelNN", "ProtoNet", "SNAIL",
           "confidence_interval"]
__all__ += ["ANIL", "EpisodicLearner", "MAML", "MetaLossResult", "MetaSGD", "clone_module"]
__all__ += ["Reptile", "iMAML"]
__all__ += ["Baseline", "cosine_logits", "fit_heads"]
