"""ltroute: long-tailed classification for the scikit-learn world."""

from ltroute.baseline import LongTailClassifier
from ltroute.dqroute import DQRouteClassifier
from ltroute.prior import PriorCorrectedClassifier
from ltroute.ride import RIDEClassifier

__version__ = "0.1.0.dev0"

__all__ = [
    "DQRouteClassifier",
    "LongTailClassifier",
    "PriorCorrectedClassifier",
    "RIDEClassifier",
    "__version__",
]
