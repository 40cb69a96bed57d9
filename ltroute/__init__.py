"""ltroute: long-tailed classification for the scikit-learn world."""

from ltroute.baseline import LongTailClassifier
from ltroute.dqroute import DQRouteClassifier
from ltroute.ride import RIDEClassifier

__version__ = "0.1.0.dev0"

__all__ = ["DQRouteClassifier", "LongTailClassifier", "RIDEClassifier", "__version__"]
