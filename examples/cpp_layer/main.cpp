// Custom layers with gradients in C++17, after PyTorch's C++ autograd tutorial, but with
// the backward pass generated ahead of time by gradc (layer.py -> layer.c, layer.h).
//
//     cmake -S . -B build && cmake --build build && ./build/cpp_layer
//
// Tensors are std::vector<double> in row-major order; the generated functions take the
// named dimensions, then pointers to the inputs, the outputs and a workspace.
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "layer.h"

namespace {

using Tensor = std::vector<double>;

// Workspace bytes in storage aligned for any scalar type (the C API needs the element
// type's alignment).
class Workspace {
public:
    explicit Workspace(std::size_t bytes) : storage_((bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t)) {}
    void *get() { return storage_.empty() ? nullptr : storage_.data(); }

private:
    std::vector<std::max_align_t> storage_;
};

void check(int status, const char *what)
{
    if (status != GRADC_OK) throw std::runtime_error(std::string(what) + " rejected its dimensions (status " + std::to_string(status) + ")");
}

void print(const char *name, const Tensor &t, std::ptrdiff_t rows, std::ptrdiff_t cols)
{
    std::printf("%s =\n", name);
    for (std::ptrdiff_t i = 0; i < rows; ++i) {
        std::printf("   ");
        for (std::ptrdiff_t j = 0; j < cols; ++j) std::printf(" %9.5f", t[i * cols + j]);
        std::printf("\n");
    }
}

// Deterministic "random" values in [-1, 1), so that the output is reproducible.
Tensor filled(std::size_t n, unsigned seed)
{
    Tensor t(n);
    for (auto &x : t) {
        seed = seed * 1664525u + 1013904223u;
        x = (seed >> 8) / 8388608.0 - 1.0;
    }
    return t;
}

double max_abs_diff(const Tensor &a, const Tensor &b)
{
    double worst = 0;
    for (std::size_t i = 0; i < a.size(); ++i) worst = std::fmax(worst, std::fabs(a[i] - b[i]));
    return worst;
}

// out = mean(3 (x + 2)^2) at x = ones(2, 2): out = 27 and d out/dx = 4.5 everywhere.
void basic_autograd()
{
    const std::ptrdiff_t N = 2, M = 2;
    Tensor x(N * M, 1.0), dx(N * M);
    double out = 0;
    Workspace ws(tutorial_workspace_size(N, M));
    check(tutorial_value_and_grad(N, M, x.data(), &out, dx.data(), ws.get()), "tutorial_value_and_grad");
    std::printf("out = %g\n", out);
    print("x.grad", dx, N, M);
}

// The tutorial's LinearFunction, y = x W^T + b, then y.sum().backward(): the gradient of a
// sum is the vjp with a cotangent of ones.
void linear_function()
{
    const std::ptrdiff_t N = 2, K = 3, M = 4;
    Tensor x = filled(N * K, 1), W = filled(M * K, 2), b = filled(M, 3);
    Tensor y(N * M), ones(N * M, 1.0), dx(N * K), dW(M * K), db(M);
    Workspace ws(linear_workspace_size(N, K, M));
    check(linear_vjp(N, K, M, x.data(), W.data(), b.data(), ones.data(), y.data(), dx.data(), dW.data(), db.data(), ws.get()), "linear_vjp");
    print("y", y, N, M);
    print("x.grad", dx, N, K);
    print("weight.grad", dW, M, K);
    print("bias.grad", db, 1, M);

    // By hand: dx[n][k] = sum_m W[m][k], dW[m][k] = sum_n x[n][k], db[m] = N.
    Tensor dx_ref(N * K, 0.0), dW_ref(M * K, 0.0), db_ref(M, double(N));
    for (std::ptrdiff_t n = 0; n < N; ++n)
        for (std::ptrdiff_t m = 0; m < M; ++m)
            for (std::ptrdiff_t k = 0; k < K; ++k) {
                dx_ref[n * K + k] += W[m * K + k];
                dW_ref[m * K + k] += x[n * K + k];
            }
    std::printf("linear: max |gradient - by hand| = %.3g\n", std::fmax(max_abs_diff(dx, dx_ref), std::fmax(max_abs_diff(dW, dW_ref), max_abs_diff(db, db_ref))));
}

// sum(sin(X W + b)^2) and its gradients, against the closed form: with Z = X W + b,
// dZ = 2 sin Z cos Z = sin 2Z, dX = dZ W^T, dW = X^T dZ, db = column sums of dZ.
void sin_layer_gradients()
{
    const std::ptrdiff_t N = 5, K = 3, M = 2;
    Tensor X = filled(N * K, 4), W = filled(K * M, 5), b = filled(M, 6);
    Tensor dX(N * K), dW(K * M), db(M);
    double loss = 0;
    Workspace ws(sin_layer_workspace_size(N, K, M));
    check(sin_layer_value_and_grad(N, K, M, X.data(), W.data(), b.data(), &loss, dX.data(), dW.data(), db.data(), ws.get()),
          "sin_layer_value_and_grad");
    std::printf("sin layer: loss = %.10f\n", loss);
    print("dX", dX, N, K);
    print("dW", dW, K, M);
    print("db", db, 1, M);

    Tensor dZ(N * M), dX_ref(N * K, 0.0), dW_ref(K * M, 0.0), db_ref(M, 0.0);
    double loss_ref = 0;
    for (std::ptrdiff_t n = 0; n < N; ++n)
        for (std::ptrdiff_t m = 0; m < M; ++m) {
            double z = b[m];
            for (std::ptrdiff_t k = 0; k < K; ++k) z += X[n * K + k] * W[k * M + m];
            loss_ref += std::sin(z) * std::sin(z);
            dZ[n * M + m] = std::sin(2 * z);
            db_ref[m] += dZ[n * M + m];
        }
    for (std::ptrdiff_t n = 0; n < N; ++n)
        for (std::ptrdiff_t k = 0; k < K; ++k)
            for (std::ptrdiff_t m = 0; m < M; ++m) {
                dX_ref[n * K + k] += dZ[n * M + m] * W[k * M + m];
                dW_ref[k * M + m] += X[n * K + k] * dZ[n * M + m];
            }
    std::printf("sin layer: |loss - closed form| = %.3g, max |gradient - closed form| = %.3g\n", std::fabs(loss - loss_ref),
                std::fmax(max_abs_diff(dX, dX_ref), std::fmax(max_abs_diff(dW, dW_ref), max_abs_diff(db, db_ref))));
}

}  // namespace

int main()
{
    try {
        basic_autograd();
        linear_function();
        sin_layer_gradients();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "cpp_layer: %s\n", e.what());
        return 1;
    }
    return 0;
}
