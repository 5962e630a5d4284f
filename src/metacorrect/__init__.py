"""metacorrect — train deep networks on noisily labelled data by Meta Loss Correction.

Convention used everywhere: a transition matrix ``T`` has ``T[i, j] = P(noisy = j | true = i)``
(rows = true classes, rows sum to 1).
"""

__version__ = "0.1.0"
