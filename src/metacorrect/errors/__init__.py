"""Which labels are wrong: suspected label errors from a trained network and its noise model T.

* :func:`find_label_errors` (:mod:`.scoring`) — the API over arrays or tensors: Bayes'
  posterior ``P(true = i | x, given = j) ∝ p(i | x) · T[i, j]`` and a flagged set;
* :func:`load_run` (:mod:`.run_folder`) — a finished run folder with its dataset, checked,
  refusing runs whose T is not a noise model;
* :mod:`.variants` / :mod:`.crossfit` — where ``p(i | x)`` comes from (the final model, the
  average over the last epochs, K-fold cross-fitting);
* :mod:`.output` (CSV, cleanlab export, terminal summary) and :mod:`.pages` (HTML/Markdown
  with thumbnails and the figure of errors per class pair).

``metacorrect errors RUN_DIR`` (the CLI) ties them together.
Orientation everywhere: ``T[i, j] = P(given = j | true = i)``, rows = true class.
"""

from .scoring import RULES, LabelErrors, find_label_errors, posterior

__all__ = ["LabelErrors", "RULES", "find_label_errors", "load_run", "posterior"]


def load_run(run_dir, **kwargs):
    """See :func:`metacorrect.errors.run_folder.load_run`."""
    from .run_folder import load_run as _load_run
    return _load_run(run_dir, **kwargs)
