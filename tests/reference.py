"""Slow, loop-based reference implementations used to check the vectorised layers.

Every function here is written with plain Python ``for`` loops over samples, output
positions, channels and kernel offsets so that each line can be checked directly
against the textbook definition. Speed is deliberately not a goal.

Conventions:
- Images are channels-last: ``x`` has shape (N, H, W, C).
- Convolution weights ``W`` have shape (k, k, C_in, F), bias ``b`` has shape (F,).
- Convolution is cross-correlation (no kernel flip):
  ``y[n, i, j, f] = b[f] + sum_{di, dj, c} xpad[n, i*s + di, j*s + dj, c] * W[di, dj, c, f]``
  where ``xpad`` is ``x`` zero-padded by ``p`` on each side of H and W.
- Max pooling uses 'valid' windows; backward routes each upstream gradient to the
  FIRST maximum of its window in row-major order, and overlapping windows accumulate.
- Everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(a: np.ndarray) -> np.ndarray:
    """Return ``a`` as a float64 array."""
    return np.asarray(a, dtype=np.float64)


def _zero_pad(x: np.ndarray, padding: int) -> np.ndarray:
    """Zero-pad an (N, H, W, C) array by ``padding`` on each side of H and W, with loops."""
    n_samples, height, width, channels = x.shape
    xpad = np.zeros((n_samples, height + 2 * padding, width + 2 * padding, channels), dtype=np.float64)
    for n in range(n_samples):
        for h in range(height):
            for w in range(width):
                for c in range(channels):
                    xpad[n, h + padding, w + padding, c] = x[n, h, w, c]
    return xpad


def _conv_output_size(size: int, k: int, stride: int, padding: int) -> int:
    """Output length along one spatial axis: ``(size + 2p - k) // s + 1``."""
    return (size + 2 * padding - k) // stride + 1


# --------------------------------------------------------------------------- convolution


def conv2d_forward(
    x: np.ndarray, W: np.ndarray, b: np.ndarray, stride: int = 1, padding: int = 0
) -> np.ndarray:
    """Cross-correlation forward pass.

    x: (N, H, W, C_in), W: (k, k, C_in, F), b: (F,). Returns y: (N, Ho, Wo, F).
    """
    x, W, b = _f64(x), _f64(W), _f64(b)
    n_samples, height, width, c_in = x.shape
    k, k2, c_in_w, n_filters = W.shape
    assert k == k2, "kernel must be square"
    assert c_in == c_in_w, "input channels of x and W must match"
    assert b.shape == (n_filters,)

    xpad = _zero_pad(x, padding)
    h_out = _conv_output_size(height, k, stride, padding)
    w_out = _conv_output_size(width, k, stride, padding)
    y = np.zeros((n_samples, h_out, w_out, n_filters), dtype=np.float64)

    for n in range(n_samples):
        for i in range(h_out):
            for j in range(w_out):
                for f in range(n_filters):
                    total = b[f]
                    for di in range(k):
                        for dj in range(k):
                            for c in range(c_in):
                                total += xpad[n, i * stride + di, j * stride + dj, c] * W[di, dj, c, f]
                    y[n, i, j, f] = total
    return y


def conv2d_backward(
    x: np.ndarray, W: np.ndarray, grad_out: np.ndarray, stride: int = 1, padding: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(conv2d_forward(x, W, b) * grad_out)``.

    Returns (grad_x, grad_W, grad_b) with the shapes of x (unpadded), W and b.
    """
    x, W, grad_out = _f64(x), _f64(W), _f64(grad_out)
    n_samples, height, width, c_in = x.shape
    k, _, _, n_filters = W.shape
    h_out = _conv_output_size(height, k, stride, padding)
    w_out = _conv_output_size(width, k, stride, padding)
    assert grad_out.shape == (n_samples, h_out, w_out, n_filters)

    xpad = _zero_pad(x, padding)
    grad_xpad = np.zeros_like(xpad)
    grad_W = np.zeros_like(W)
    grad_b = np.zeros(n_filters, dtype=np.float64)

    # Each term  xpad[n, i*s+di, j*s+dj, c] * W[di, dj, c, f]  of y[n, i, j, f]
    # contributes grad_out[n, i, j, f] times the other factor to each factor's gradient.
    for n in range(n_samples):
        for i in range(h_out):
            for j in range(w_out):
                for f in range(n_filters):
                    g = grad_out[n, i, j, f]
                    grad_b[f] += g
                    for di in range(k):
                        for dj in range(k):
                            for c in range(c_in):
                                row = i * stride + di
                                col = j * stride + dj
                                grad_W[di, dj, c, f] += xpad[n, row, col, c] * g
                                grad_xpad[n, row, col, c] += W[di, dj, c, f] * g

    # Drop the padding: only the original positions are inputs.
    grad_x = np.zeros_like(x)
    for n in range(n_samples):
        for h in range(height):
            for w in range(width):
                for c in range(c_in):
                    grad_x[n, h, w, c] = grad_xpad[n, h + padding, w + padding, c]
    return grad_x, grad_W, grad_b


# --------------------------------------------------------------------------- max pooling


def _first_argmax_in_window(
    x: np.ndarray, n: int, c: int, row0: int, col0: int, pool: int
) -> tuple[int, int]:
    """Position (row, col) of the FIRST maximum of a pool x pool window, scanning row-major.

    Only a strictly greater value replaces the current best, so ties keep the earliest one.
    """
    best_row, best_col = row0, col0
    best_val = x[n, row0, col0, c]
    for di in range(pool):
        for dj in range(pool):
            value = x[n, row0 + di, col0 + dj, c]
            if value > best_val:
                best_val = value
                best_row, best_col = row0 + di, col0 + dj
    return best_row, best_col


def maxpool_forward(x: np.ndarray, pool: int = 2, stride: int | None = None) -> np.ndarray:
    """Per-channel max pooling with 'valid' windows. x: (N, H, W, C) -> (N, Ho, Wo, C).

    ``stride=None`` means ``stride = pool``. ``Ho = (H - pool) // stride + 1``.
    """
    x = _f64(x)
    if stride is None:
        stride = pool
    n_samples, height, width, channels = x.shape
    h_out = (height - pool) // stride + 1
    w_out = (width - pool) // stride + 1
    y = np.zeros((n_samples, h_out, w_out, channels), dtype=np.float64)

    for n in range(n_samples):
        for i in range(h_out):
            for j in range(w_out):
                for c in range(channels):
                    best = x[n, i * stride, j * stride, c]
                    for di in range(pool):
                        for dj in range(pool):
                            value = x[n, i * stride + di, j * stride + dj, c]
                            best = max(best, value)
                    y[n, i, j, c] = best
    return y


def maxpool_backward(
    x: np.ndarray, grad_out: np.ndarray, pool: int = 2, stride: int | None = None
) -> np.ndarray:
    """Gradient of ``sum(maxpool_forward(x) * grad_out)`` with respect to x.

    Each upstream gradient goes entirely to the first maximum (row-major) of its window;
    contributions from overlapping windows that pick the same position are summed.
    """
    x, grad_out = _f64(x), _f64(grad_out)
    if stride is None:
        stride = pool
    n_samples, height, width, channels = x.shape
    h_out = (height - pool) // stride + 1
    w_out = (width - pool) // stride + 1
    assert grad_out.shape == (n_samples, h_out, w_out, channels)

    grad_x = np.zeros_like(x)
    for n in range(n_samples):
        for i in range(h_out):
            for j in range(w_out):
                for c in range(channels):
                    row, col = _first_argmax_in_window(x, n, c, i * stride, j * stride, pool)
                    grad_x[n, row, col, c] += grad_out[n, i, j, c]
    return grad_x


# --------------------------------------------------------------------------- dense


def dense_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fully connected layer: ``y[n, u] = b[u] + sum_i x[n, i] * W[i, u]``.

    x: (N, in_features), W: (in_features, units), b: (units,). Returns (N, units).
    """
    x, W, b = _f64(x), _f64(W), _f64(b)
    n_samples, in_features = x.shape
    in_features_w, units = W.shape
    assert in_features == in_features_w
    assert b.shape == (units,)

    y = np.zeros((n_samples, units), dtype=np.float64)
    for n in range(n_samples):
        for u in range(units):
            total = b[u]
            for i in range(in_features):
                total += x[n, i] * W[i, u]
            y[n, u] = total
    return y


def dense_backward(
    x: np.ndarray, W: np.ndarray, grad_out: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(dense_forward(x, W, b) * grad_out)``.

    Returns (grad_x, grad_W, grad_b) with the shapes of x, W and b.
    """
    x, W, grad_out = _f64(x), _f64(W), _f64(grad_out)
    n_samples, in_features = x.shape
    _, units = W.shape
    assert grad_out.shape == (n_samples, units)

    grad_x = np.zeros_like(x)
    grad_W = np.zeros_like(W)
    grad_b = np.zeros(units, dtype=np.float64)
    for n in range(n_samples):
        for u in range(units):
            g = grad_out[n, u]
            grad_b[u] += g
            for i in range(in_features):
                grad_W[i, u] += x[n, i] * g
                grad_x[n, i] += W[i, u] * g
    return grad_x, grad_W, grad_b


# --------------------------------------------------------------------------- loss


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient.

    logits: (N, K), labels: (N,) integer class indices.
    loss = mean_n -log softmax(logits[n])[labels[n]];
    grad_logits = (softmax(logits) - onehot(labels)) / N.
    Logits are shifted by their per-sample max, so large values stay finite.
    """
    logits = _f64(logits)
    labels = np.asarray(labels)
    n_samples, n_classes = logits.shape
    assert labels.shape == (n_samples,)

    total_loss = 0.0
    grad_logits = np.zeros_like(logits)
    for n in range(n_samples):
        label = int(labels[n])
        assert 0 <= label < n_classes

        # Subtracting the max does not change softmax but avoids overflow in exp.
        row_max = logits[n, 0]
        for k in range(n_classes):
            row_max = max(row_max, logits[n, k])

        sum_exp = 0.0
        for k in range(n_classes):
            sum_exp += np.exp(logits[n, k] - row_max)
        log_sum_exp = np.log(sum_exp)

        # -log softmax[label] = log(sum_k exp(z_k - m)) - (z_label - m)
        total_loss += log_sum_exp - (logits[n, label] - row_max)

        for k in range(n_classes):
            prob = np.exp(logits[n, k] - row_max) / sum_exp
            onehot = 1.0 if k == label else 0.0
            grad_logits[n, k] = (prob - onehot) / n_samples

    return float(total_loss / n_samples), grad_logits


# --------------------------------------------------------------------------- batch normalisation


def _positions(x: np.ndarray) -> list[tuple[int, ...]]:
    """Every index tuple over all axes but the last (the channel axis)."""
    return list(np.ndindex(x.shape[:-1]))


def batchnorm_batch_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and BIASED variance (divided by M, the number of positions) of x."""
    x = _f64(x)
    channels = x.shape[-1]
    positions = _positions(x)
    m = len(positions)
    mean = np.zeros(channels, dtype=np.float64)
    var = np.zeros(channels, dtype=np.float64)
    for c in range(channels):
        total = 0.0
        for p in positions:
            total += x[(*p, c)]
        mean[c] = total / m
        squares = 0.0
        for p in positions:
            squares += (x[(*p, c)] - mean[c]) ** 2
        var[c] = squares / m
    return mean, var


def batchnorm_forward_training(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """y = gamma * (x - mean) / sqrt(var + eps) + beta with the batch's own per-channel mean and biased var."""
    mean, var = batchnorm_batch_statistics(x)
    return batchnorm_forward_eval(x, gamma, beta, mean, var, eps)


def batchnorm_forward_eval(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, running_mean: np.ndarray,
                           running_var: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta, per channel, element by element."""
    x, gamma, beta = _f64(x), _f64(gamma), _f64(beta)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    y = np.zeros_like(x)
    for p in _positions(x):
        for c in range(x.shape[-1]):
            y[(*p, c)] = gamma[c] * (x[(*p, c)] - running_mean[c]) / math.sqrt(running_var[c] + eps) + beta[c]
    return y


def batchnorm_backward(x: np.ndarray, gamma: np.ndarray, grad_out: np.ndarray,
                       eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(batchnorm_forward_training(x, gamma, beta) * grad_out)``: (grad_x, grad_gamma, grad_beta).

    Written with the full Jacobian of xhat, element pair by element pair, not with the compact formula.
    Within one channel, with s = 1 / sqrt(var + eps) and M positions,
      xhat_i = (x_i - mean) * s,  d mean / d x_j = 1/M,  d var / d x_j = 2 (x_j - mean) / M
      (the term through the mean vanishes, since sum_i (x_i - mean) = 0),  d s / d var = -s^3 / 2, so
      d xhat_i / d x_j = s * ([i == j] - 1/M) - (x_i - mean) * s^3 * (x_j - mean) / M,
    and grad_x_j = sum_i grad_out_i * gamma * d xhat_i / d x_j.
    """
    x, gamma, grad_out = _f64(x), _f64(gamma), _f64(grad_out)
    assert grad_out.shape == x.shape
    mean, var = batchnorm_batch_statistics(x)
    positions = _positions(x)
    m = len(positions)
    grad_x = np.zeros_like(x)
    grad_gamma = np.zeros(x.shape[-1], dtype=np.float64)
    grad_beta = np.zeros(x.shape[-1], dtype=np.float64)
    for c in range(x.shape[-1]):
        s = 1.0 / math.sqrt(var[c] + eps)
        for i in positions:
            g = grad_out[(*i, c)]
            grad_gamma[c] += g * (x[(*i, c)] - mean[c]) * s
            grad_beta[c] += g
        for j in positions:
            total = 0.0
            for i in positions:
                kronecker = 1.0 if i == j else 0.0
                dxhat_i_dx_j = s * (kronecker - 1.0 / m) - (x[(*i, c)] - mean[c]) * s ** 3 * (x[(*j, c)] - mean[c]) / m
                total += grad_out[(*i, c)] * gamma[c] * dxhat_i_dx_j
            grad_x[(*j, c)] = total
    return grad_x, grad_gamma, grad_beta


def batchnorm_running_statistics(batches: list[np.ndarray], momentum: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """running_mean and running_var after training steps on these batches, from 0 and 1, as PyTorch does:
    running = (1 - momentum) * running + momentum * statistic, with the UNBIASED variance (divided by M - 1)."""
    channels = batches[0].shape[-1]
    running_mean = np.zeros(channels, dtype=np.float64)
    running_var = np.ones(channels, dtype=np.float64)
    for x in batches:
        mean, var = batchnorm_batch_statistics(x)
        m = len(_positions(x))
        for c in range(channels):
            unbiased_var = var[c] * m / (m - 1)
            running_mean[c] = (1 - momentum) * running_mean[c] + momentum * mean[c]
            running_var[c] = (1 - momentum) * running_var[c] + momentum * unbiased_var
    return running_mean, running_var


# --------------------------------------------------------------------------- dropout


def dropout_mask(uniform: np.ndarray, rate: float) -> np.ndarray:
    """The inverted-dropout mask for uniform draws u in [0, 1): 1 / (1 - rate) where u >= rate, else 0."""
    uniform = _f64(uniform)
    mask = np.zeros_like(uniform)
    for index in np.ndindex(uniform.shape):
        mask[index] = 1.0 / (1.0 - rate) if uniform[index] >= rate else 0.0
    return mask


def dropout_forward(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """y = x * mask, element by element (training; evaluation is the identity)."""
    x, mask = _f64(x), _f64(mask)
    y = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        y[index] = x[index] * mask[index]
    return y


def dropout_backward(grad_out: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """grad_x = grad_out * mask, element by element."""
    grad_out, mask = _f64(grad_out), _f64(mask)
    grad_x = np.zeros_like(grad_out)
    for index in np.ndindex(grad_out.shape):
        grad_x[index] = grad_out[index] * mask[index]
    return grad_x


# --------------------------------------------------------------------------- average pooling


def avgpool_forward(x: np.ndarray, pool: int = 2, stride: int | None = None) -> np.ndarray:
    """Per-channel average pooling with 'valid' windows. x: (N, H, W, C) -> (N, Ho, Wo, C).

    ``stride=None`` means ``stride = pool``. ``Ho = (H - pool) // stride + 1``.
    """
    x = _f64(x)
    if stride is None:
        stride = pool
    n_samples, height, width, channels = x.shape
    h_out = (height - pool) // stride + 1
    w_out = (width - pool) // stride + 1
    y = np.zeros((n_samples, h_out, w_out, channels), dtype=np.float64)
    for n in range(n_samples):
        for i in range(h_out):
            for j in range(w_out):
                for c in range(channels):
                    total = 0.0
                    for di in range(pool):
                        for dj in range(pool):
                            total += x[n, i * stride + di, j * stride + dj, c]
                    y[n, i, j, c] = total / (pool * pool)
    return y


def avgpool_backward(x: np.ndarray, grad_out: np.ndarray, pool: int = 2, stride: int | None = None) -> np.ndarray:
    """Gradient of ``sum(avgpool_forward(x) * grad_out)`` with respect to x: each window's upstream gradient,
    divided by pool^2, goes to every input of the window; overlapping windows add up."""
    x, grad_out = _f64(x), _f64(grad_out)
    if stride is None:
        stride = pool
    n_samples, height, width, channels = x.shape
    h_out = (height - pool) // stride + 1
    w_out = (width - pool) // stride + 1
    assert grad_out.shape == (n_samples, h_out, w_out, channels)
    grad_x = np.zeros_like(x)
    for n in range(n_samples):
        for i in range(h_out):
            for j in range(w_out):
                for c in range(channels):
                    for di in range(pool):
                        for dj in range(pool):
                            grad_x[n, i * stride + di, j * stride + dj, c] += grad_out[n, i, j, c] / (pool * pool)
    return grad_x


# --------------------------------------------------------------------------- tanh


def tanh_forward(x: np.ndarray) -> np.ndarray:
    """y = tanh(x), element by element, with math.tanh."""
    x = _f64(x)
    y = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        y[index] = math.tanh(x[index])
    return y


def tanh_backward(x: np.ndarray, grad_out: np.ndarray) -> np.ndarray:
    """grad_x = grad_out * (1 - tanh(x)^2), element by element (d tanh(x) / dx = 1 - tanh(x)^2)."""
    x, grad_out = _f64(x), _f64(grad_out)
    grad_x = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        grad_x[index] = grad_out[index] * (1.0 - math.tanh(x[index]) ** 2)
    return grad_x
