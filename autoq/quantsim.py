"""Numpy simulation of what a precision does to a weight or an activation, read from its spec; the sensitivity
analyzers (SQNR, HAWQ) measure the noise of these. Weight-only roundings beyond nearest (HQQ, GPTQ, AWQ, scale
estimation) are simulated as round-to-nearest: an upper bound on their noise. Non-uniform formats (NF4, a
codebook fixed or fitted by k-means to the layer, float8/float4 weights) round to their nearest value."""

from __future__ import annotations

import numpy as np

from autoq.precision import Kind, Precision

# The non-uniform weight formats' values, each scaled per channel or group so that its largest |value| maps to the
# block's largest |weight|: NormalFloat4 (QLoRA's normal quantiles), NNCF's CB4 codebook, float4 E2M1
CODEBOOKS = {
    "nf4": np.array([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0, 0.0795803,
                     0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]),
    "cb4": np.array([-3.5, -2.5, -1.875, -1.375, -1.0, -0.625, -0.3125, 0.0, 0.28125, 0.5625, 0.875, 1.125, 1.5, 2.0,
                     2.5, 3.5]),
    "fp4": np.array([-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
}


def _e4m3() -> np.ndarray:
    """Every finite float8 E4M3 value (largest 448): subnormals m/8 * 2^-6, normals (1 + m/8) * 2^(e-7)."""
    positive = [m / 8 * 2.0 ** -6 for m in range(8)] + [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16)
                                                        for m in range(8) if (e, m) != (15, 7)]
    return np.unique(np.concatenate([-np.array(positive), positive]))


CODEBOOKS["fp8"] = _e4m3()


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to bfloat16 (nearest even), back in float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def round_activation(x: np.ndarray, low: float, high: float, symmetric: bool = False) -> np.ndarray:
    """uint8 fake-quantization with a calibrated range (zero exactly representable); symmetric: the range
    +-max(|low|, |high|) around zero point 128."""
    low, high = min(low, 0.0), max(high, 0.0)
    if symmetric:
        low, high = -max(-low, high), max(-low, high)
    scale = max(high - low, 1e-12) / 255
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def signed_scales(blocks: np.ndarray, axis: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """One signed scale per block along `axis`, its largest |weight| landing on -2^(bits-1) exactly (MatMulNBits'
    and NNCF's symmetric grid), and where that weight sits in each block."""
    at = np.abs(blocks).argmax(axis=axis)
    extreme = np.take_along_axis(blocks, np.expand_dims(at, axis), axis=axis)
    return np.where(np.abs(extreme) < 1e-12, 1e-12, extreme / -(2 ** (bits - 1))), at


def _round_channels(w: np.ndarray, axis: int, bits: int, symmetric: bool, group: int,
                    codebook: np.ndarray | None = None, signed: bool = False) -> np.ndarray:
    """Integer rounding with one scale per channel along `axis` (per `group` consecutive inputs of each channel
    of a 2-D weight when `group`); `signed`: symmetric weight-only blocks on MatMulNBits' and NNCF's grid (2^bits
    levels, the scale signed), else +-(2^(bits-1) - 1); with a `codebook`, its nearest value once scaled to the
    block's range."""
    channels = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    width = channels.shape[1]
    if group:  # the last block padded with zeros, as MatMulNBits pads it (SmolLM2's 576 inputs in blocks of 128)
        padded = np.pad(channels, ((0, 0), (0, -width % group)))
        blocks = padded.reshape(channels.shape[0], -1, group)
    else:
        blocks = channels[:, None, :]
    if codebook is not None:
        scale = np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-12) / np.abs(codebook).max()
        scale = scale.astype(np.float16).astype(np.float64)  # stored in f16 (NNCF): a value near a midpoint moves
        scaled = blocks / scale
        index = np.clip(np.searchsorted(codebook, scaled), 1, len(codebook) - 1)
        nearer_below = scaled - codebook[index - 1] < codebook[index] - scaled
        rounded = codebook[np.where(nearer_below, index - 1, index)] * scale
    elif symmetric and signed:
        scale, _ = signed_scales(blocks, 2, bits)
        rounded = np.clip(np.round(blocks / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    elif symmetric:
        levels = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-12) / levels
        rounded = np.clip(np.round(blocks / scale), -levels, levels) * scale
    else:
        low, high = np.minimum(blocks.min(axis=2, keepdims=True), 0), np.maximum(blocks.max(axis=2, keepdims=True), 0)
        scale = np.maximum(high - low, 1e-12) / (2 ** bits - 1)
        zero = np.round(-low / scale)
        rounded = (np.clip(np.round(blocks / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
    moved = np.moveaxis(w, axis, 0)
    rounded = rounded.reshape(channels.shape[0], -1)[:, :width]
    return np.moveaxis(rounded.reshape(moved.shape), 0, axis).astype(w.dtype)


KMEANS_ITERATIONS = 25


def kmeans_codebook(w: np.ndarray, axis: int, group: int, values: int = 16) -> np.ndarray:
    """`values` levels fitted by k-means (Lloyd, from the quantiles) to a weight's values, each divided by its
    block's largest |value| (output channels along `axis`, blocks of `group` inputs or whole channels), the ends
    kept at -1 and 1 (every block has one of them, and NNCF scales a block by its largest |value| over the
    codebook's): the codebook of `km4`, one per layer."""
    channels = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    blocks = (np.pad(channels, ((0, 0), (0, -channels.shape[1] % group))).reshape(len(channels), -1, group)
              if group else channels[:, None, :])
    normalised = (blocks / np.maximum(np.abs(blocks).max(axis=2, keepdims=True), 1e-12)).reshape(-1)
    centres = np.quantile(normalised, np.linspace(0, 1, values))
    centres[0], centres[-1] = -1.0, 1.0
    for _ in range(KMEANS_ITERATIONS):
        nearest = np.searchsorted((centres[1:] + centres[:-1]) / 2, normalised)
        sums, counts = np.bincount(nearest, normalised, values), np.bincount(nearest, minlength=values)
        inner = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        centres = np.sort(np.concatenate([[-1.0], inner[1:-1], [1.0]]))
    return centres.astype(np.float32)


def round_weight(w: np.ndarray, axis: int, precision: Precision) -> np.ndarray:
    """The weight as `precision` stores it (output channels along `axis`)."""
    if precision.kind == Kind.FLOAT:
        return w if precision.bits == 32 else to_bf16(w)
    if precision.granularity == "tensor":
        return _round_channels(w.reshape(1, -1), 0, precision.bits, True, 0).reshape(w.shape)
    symmetric = precision.symmetric or precision.kind != Kind.WEIGHT_ONLY  # int8 weights are symmetric
    codebook = CODEBOOKS.get(precision.weight_label) if precision.element != "int" else None
    if precision.element == "km":
        codebook = kmeans_codebook(w, axis, precision.group).astype(np.float64)
    return _round_channels(w, axis, precision.bits, symmetric, precision.group, codebook,
                           signed=precision.kind == Kind.WEIGHT_ONLY)


def noise_ratio(signal: np.ndarray, noisy: np.ndarray, axis: int) -> float:
    """Noise-to-signal power, the worse of two views: averaged over channels along `axis` (every channel matters
    to the next layer, so one outlier channel must not hide the others being rounded away) and pooled over the
    whole tensor (clipping a few outlier channels, a transformer's most important features, loses most of the
    power while leaving the channel average almost untouched)."""
    reduce = tuple(i for i in range(signal.ndim) if i != axis % signal.ndim)
    power = np.sum(signal.astype(np.float64) ** 2, axis=reduce)
    noise = np.sum((signal.astype(np.float64) - noisy) ** 2, axis=reduce)
    live = power > 0
    if not live.any():
        return 0.0
    return float(max(np.mean(noise[live] / power[live]), noise.sum() / power.sum()))


def smoothing_scale(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel scale `s = a^alpha / w^(1 - alpha)` (`a`: the channel's largest |input|,
    `w`: the largest |weight| in its row): the input is divided by it, the weight rows multiplied. A channel
    (almost) silent on the calibration samples counts as a tenth of the median channel: divided by its own tiny
    scale, a value it takes later would take the whole per-tensor range."""
    activation_max = np.maximum(activation_max, 0.1 * float(np.median(activation_max)))
    return (np.maximum(activation_max, 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)).astype(
        np.float32)
