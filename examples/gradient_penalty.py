"""A gradient penalty, as in the PyTorch C++ autograd tutorial.

A linear layer output = input @ Wt^T + b; the loss is the MSE against a target plus
mean((||d sum(output) / d input||_2 per row - 1)^2). The inner gradient is taken inside
the kernel with gradc.grad, and gradc differentiates through it for the outer gradient.
"""

import numpy as np

import gradc
from gradc import f32


@gradc.kernel
def gradient_penalty(input: f32["B", 4], Wt: f32[3, 4], b: f32[3], target: f32["B", 3]):
    def linear(x):
        return x @ Wt.T + b

    output = linear(input)
    mse = gradc.mean((output - target) ** 2)
    g = gradc.grad(lambda x: gradc.sum(linear(x)))(input)
    norms = gradc.sqrt(gradc.sum(g * g, axis=1))
    penalty = gradc.mean((norms - 1) ** 2)
    return mse + penalty


def example_inputs(batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    inp = rng.standard_normal((batch, 4)).astype(np.float32)
    Wt = rng.standard_normal((3, 4)).astype(np.float32) * 0.5
    b = rng.standard_normal(3).astype(np.float32)
    target = rng.standard_normal((batch, 3)).astype(np.float32)
    return inp, Wt, b, target


if __name__ == "__main__":
    np.set_printoptions(precision=5, suppress=True)
    inp, Wt, b, target = example_inputs()
    k = gradc.compile(gradient_penalty, wrt=["input", "Wt"])
    loss, (d_input, d_Wt) = k.value_and_grad(inp, Wt, b, target)
    print("loss =", float(loss))
    print("d loss / d input =\n", d_input)
    print("d loss / d Wt =\n", d_Wt)

    # Check against central finite differences of a float64 evaluation.
    k64 = gradc.compile(gradient_penalty, wrt=["input", "Wt"], dtype="f64")
    args = [a.astype(np.float64) for a in (inp, Wt, b, target)]
    _, grads64 = k64.value_and_grad(*args)
    errors = []
    for which, g in zip((0, 1), grads64):
        for idx in np.ndindex(args[which].shape):
            h = 1e-6
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            fd = (float(k64(*plus)) - float(k64(*minus))) / (2 * h)
            errors.append(abs(fd - g[idx]))
    print(f"max |gradient - finite difference| (float64) = {np.max(errors):.2e}")
