"""ltroute: long-tailed classification for the scikit-learn world."""

from ltroute.baseline import LongTailClassifier

__version__ = "0.1.0.dev0"

__all__ = ["LongTailClassifier", "__version__"]
