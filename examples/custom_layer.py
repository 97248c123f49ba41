"""A custom dense layer with a sine activation, loss = sum(sin(X @ W)**2).

From the TensorFlow/Eigen custom-gradient tutorial. With Z = X @ W the closed form of the
gradients is dZ = 2 sin(Z) cos(Z) = sin(2Z), dW = X^T dZ, dX = dZ W^T.
"""

import numpy as np

import gradc
from gradc import f32


@gradc.kernel
def custom_layer(X: f32["N", "K"], W: f32["K", "M"]):
    Y = gradc.sin(X @ W)
    return gradc.sum(Y * Y)


X_EXAMPLE = np.array([[-1.0, 0.0, 1.0], [2.0, 3.0, 4.0], [-1.0, -5.0, 2.0]], dtype=np.float32)


def example_weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 2)).astype(np.float32)


if __name__ == "__main__":
    np.set_printoptions(precision=5, suppress=True)
    X, W = X_EXAMPLE, example_weights()
    k = gradc.compile(custom_layer, wrt=["X", "W"])
    loss, (dX, dW) = k.value_and_grad(X, W)

    Z = X.astype(np.float64) @ W
    dZ = np.sin(2 * Z)
    print("loss =", float(loss), "   closed form:", float(np.sum(np.sin(Z) ** 2)))
    print("dW =\n", dW)
    print("closed form X^T sin(2Z) =\n", X.T @ dZ)
    print("dX =\n", dX)
    print("closed form sin(2Z) W^T =\n", dZ @ W.T)
    print("max |dW - closed form| =", float(np.abs(dW - X.T @ dZ).max()))
    print("max |dX - closed form| =", float(np.abs(dX - dZ @ W.T).max()))
