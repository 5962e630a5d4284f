"""A whole MLC fit on the embedded digits (1,797 images, 10 % trusted), shared by the tests
that check what MLC learns end to end."""

import torch

from metacorrect.data import load_dataset, make_problem
from metacorrect.models import create_model
from metacorrect.train import TensorBatchLoader, fit


def fit_digits_mlc(noise, strength, epochs, **kw):
    """MLC (its options and ``fit``'s keywords in ``kw``) on digits under ``noise`` at
    ``strength``: returns the fit's result, the true T and the balanced trusted weight
    ``5 · n_trusted / n_noisy``."""
    ds = load_dataset("digits")
    problem = make_problem(ds, noise, strength, 0.1, 0)
    torch.manual_seed(0)
    model = create_model("mlp", ds.input_shape, ds.num_classes)
    noisy = TensorBatchLoader(*problem.tensors("noisy"), 32, seed=1, transform=ds.train_transform)
    trusted = TensorBatchLoader(*problem.tensors("trusted"), 32, seed=2, transform=ds.train_transform)
    test = TensorBatchLoader(*problem.tensors("test"), 1000, shuffle=False, transform=ds.test_transform)
    result = fit(model, torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-6), noisy, trusted, "mlc",
                 epochs=epochs, num_classes=ds.num_classes, T_true=problem.T_true, test_loader=test, device="cpu",
                 **kw)
    return result, problem.T_true, 5 * trusted.num_examples / noisy.num_examples
