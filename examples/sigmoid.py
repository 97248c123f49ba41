"""The sigmoid 1 / (1 + exp(-x)) and its derivative at x = 2, in float32 and float64.

Closed form: sigma(2) = 0.880797..., sigma'(2) = sigma(2) * (1 - sigma(2)) = 0.104994...
"""

import gradc
from gradc import f64


@gradc.kernel
def sigmoid(x: f64[()]):
    return 1 / (1 + gradc.exp(-x))


if __name__ == "__main__":
    for dtype in ("f32", "f64"):
        k = gradc.compile(sigmoid, wrt=["x"], dtype=dtype)
        y, (dy,) = k.value_and_grad(2.0)
        print(f"{dtype}: sigmoid(2) = {float(y):.6f}   d sigmoid/dx (2) = {float(dy):.6f}")
