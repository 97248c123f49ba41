"""The computation-graph example: e = (a + b) * (b + 1) at a = 2, b = 1.

By hand: e = 6, de/da = b + 1 = 2, de/db = (b + 1) + (a + b) = 5.
"""

import gradc
from gradc import f64


@gradc.kernel
def computation_graph(a: f64[()], b: f64[()]):
    c = a + b
    d = b + 1
    e = c * d
    return e


if __name__ == "__main__":
    k = gradc.compile(computation_graph, wrt=["a", "b"])
    e, (de_da, de_db) = k.value_and_grad(2.0, 1.0)
    print(f"e = (a + b) * (b + 1) at a = 2, b = 1")
    print(f"e     = {e:g}")
    print(f"de/da = {de_da:g}")
    print(f"de/db = {de_db:g}")
