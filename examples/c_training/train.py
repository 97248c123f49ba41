"""The training run of train.c, driven from Python through the same kernels.

    python train.py          # prints what ./build/train prints, to float tolerance

Same data, same standardisation, same random initial weights and batch order (the
xorshift generator of train.c), same Adam steps: the numbers come out of the same
generated C, so the two programs agree. Only the loop is written twice.
"""

import math
import sys
from pathlib import Path

import numpy as np

import gradc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import model  # noqa: E402

HIDDEN = 16
EPOCHS = 100
BATCH = 30
LEARNING_RATE = 0.01
PRINT_EVERY = 10
SEED = 2024
SPECIES = ["setosa", "versicolor", "virginica"]


class XorShift32:
    """train.c's random number generator (Marsaglia's xorshift32), bit for bit."""

    def __init__(self, seed: int):
        self.state = seed & 0xFFFFFFFF

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x

    def uniform(self) -> float:
        """In [0, 1), with 24 random bits: exact in float and in double."""
        return (self.next() >> 8) * (1.0 / 16777216.0)


def load_iris(path: Path = HERE / "iris.csv") -> tuple[np.ndarray, np.ndarray]:
    """Features (150 x 4, float32) and class indices, as train.c reads them."""
    rows = path.read_text().split()[1:]
    features = np.array([[float(v) for v in r.split(",")[:4]] for r in rows], dtype=np.float32)
    labels = np.array([SPECIES.index(r.split(",")[4]) for r in rows])
    return features, labels


def standardize(features: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column, summed in double in train.c's order."""
    n, f = features.shape
    out = np.empty_like(features)
    for j in range(f):
        column = [float(features[i, j]) for i in range(n)]
        mean = 0.0
        for x in column:
            mean += x
        mean /= n
        var = 0.0
        for x in column:
            var += (x - mean) * (x - mean)
        sd = math.sqrt(var / n)
        for i in range(n):
            out[i, j] = np.float32((column[i] - mean) / sd)
    return out


def initial_weights(rng: XorShift32, f: int, h: int, c: int) -> np.ndarray:
    """theta = [W1, b1, W2, b2]: weights uniform in +-1/sqrt(fan in), biases 0."""
    theta = np.zeros(f * h + h + h * c + c, dtype=np.float32)
    for start, count, fan_in in ((0, f * h, f), (f * h + h, h * c, h)):
        scale = 1.0 / math.sqrt(fan_in)
        for i in range(count):
            theta[start + i] = np.float32((2.0 * rng.uniform() - 1.0) * scale)
    return theta


def split(theta: np.ndarray, f: int, h: int, c: int) -> list[np.ndarray]:
    """Views of W1, b1, W2, b2 inside the flat theta."""
    shapes = [(f, h), (h,), (h, c), (c,)]
    views, at = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        views.append(theta[at : at + size].reshape(shape))
        at += size
    return views


def train(cflags=None, out=print) -> tuple[list[tuple[int, float]], float]:
    """Train as train.c does; returns the printed (epoch, loss) pairs and the final accuracy."""
    loss = gradc.compile(model.loss, cflags=cflags)
    predict = gradc.compile(model.predict, cflags=cflags)
    step = gradc.compile(model.step, cflags=cflags)

    raw, labels = load_iris()
    X = standardize(raw)
    n, f = X.shape
    c = len(SPECIES)
    Y = np.eye(c, dtype=np.float32)[labels]
    rng = XorShift32(SEED)
    theta = initial_weights(rng, f, HIDDEN, c)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    order = list(range(n))
    lr = np.float32(LEARNING_RATE)
    t = 0
    p = theta.size
    out(f"Iris: {n} samples, {f} features, {c} classes; MLP {f}-{HIDDEN}-{c} ({p} parameters), Adam, batches of {BATCH}")
    history = [(0, float(loss(X, *split(theta, f, HIDDEN, c), Y)))]
    out(f"epoch {0:4d}  loss {history[0][1]:.6f}")
    for epoch in range(1, EPOCHS + 1):
        for i in range(n - 1, 0, -1):  # Fisher-Yates, as in train.c
            j = rng.next() % (i + 1)
            order[i], order[j] = order[j], order[i]
        for start in range(0, n, BATCH):
            batch = order[start : start + BATCH]
            _, grads = loss.value_and_grad(X[batch], *split(theta, f, HIDDEN, c), Y[batch])
            grad = np.concatenate([g.ravel() for g in grads])
            t += 1
            theta, m, v = step(theta, grad, m, v, np.float32(t), lr)
        if epoch % PRINT_EVERY == 0:
            value = float(loss(X, *split(theta, f, HIDDEN, c), Y))
            history.append((epoch, value))
            out(f"epoch {epoch:4d}  loss {value:.6f}")
    logits = predict(X, *split(theta, f, HIDDEN, c))
    correct = int(np.sum(np.argmax(logits, axis=1) == labels))
    out(f"training accuracy {correct / n:.4f} ({correct}/{n})")
    return history, correct / n


if __name__ == "__main__":
    train()
