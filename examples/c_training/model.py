"""An MLP classifier for the Iris data, and its optimiser step, as gradc kernels.

`make` turns this file into build/model.c and build/model.h (gradc compile --emit c);
train.c calls them, and train.py calls the same kernels from Python.

    logits = tanh(X @ W1 + b1) @ W2 + b2
    loss   = mean over samples of  logsumexp(logits) - logits[true class]   (softmax cross-entropy)

The parameters live in one flat array theta[P] (W1, then b1, W2, b2), so that one call of
the Adam kernel updates them all; train.c points each layer's argument into it.
"""

import gradc
from gradc import f32

PARAMS = ["W1", "b1", "W2", "b2"]


def mlp(X, W1, b1, W2, b2):
    hidden = gradc.tanh(X @ W1 + b1)
    return hidden @ W2 + b2


@gradc.kernel(wrt=PARAMS)
def loss(X: f32["N", "F"], W1: f32["F", "H"], b1: f32["H"], W2: f32["H", "C"], b2: f32["C"], Y: f32["N", "C"]):
    """Mean softmax cross-entropy of the samples X (N x F) with one-hot labels Y (N x C)."""
    logits = mlp(X, W1, b1, W2, b2)
    return gradc.mean(gradc.logsumexp(logits, axis=1) - gradc.sum(Y * logits, axis=1))


@gradc.kernel(wrt=[])
def predict(X: f32["N", "F"], W1: f32["F", "H"], b1: f32["H"], W2: f32["H", "C"], b2: f32["C"]):
    """The class scores (logits) of the samples X; the predicted class is the largest."""
    return mlp(X, W1, b1, W2, b2)


# One Adam step over all P parameters; the learning rate is an input (a 0-d array).
step = gradc.optim.adam("P")
