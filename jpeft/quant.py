"""Blockwise quantization kernels for a frozen base weight (QLoRA), bit-exact with bitsandbytes.

QLoRA (Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023) keeps the
base weight in 4 bits and trains adapters on top of it, dequantizing the weight where it
is used. This module is the numerical layer of that: pure functions from an array to its
quantized *parts* (a dict of arrays) and back, written in ``jax.numpy`` so that
:func:`dequantize_blocks` runs inside a jitted step and XLA fuses it into the matmul
operand, and :func:`quantize_blocks` quantizes a checkpoint on device without a Python
loop over blocks. Both work under ``jit`` and ``vmap``.

Reference: bitsandbytes' CPU backend (0.50), ``bitsandbytes.functional.quantize_4bit``
(``compress_statistics`` for double quantization), ``dequantize_4bit`` and
``int8_vectorwise_quant``. The codes and scales are the same bits as bitsandbytes';
the dequantized values too (see *Exactness* for the limits).

Block layout
------------
The array is flattened row-major (as bitsandbytes flattens a tensor) and cut into
``n_blocks = size // block_size`` consecutive blocks (``size`` must be a multiple of
``block_size``). Each block ``b`` keeps its absolute maximum
``absmax_b = max_{i in b} |x_i|`` (float32) and each value is stored relative to it.

Code books (4-bit kinds)
------------------------
A 4-bit code ``q`` stands for the value ``CODE[q] * absmax_b``:

- ``nf4``, NormalFloat: ``NF4_CODE``, 16 quantiles of N(0, 1) scaled to [-1, 1] (QLoRA
  section 3, appendix E): 7 negative values, an exact 0, 8 positive values, so both 0 and
  +-1 are represented. Its codes 0..15 are its values in increasing order.
- ``fp4``: ``FP4_CODE``, a 1-sign, 2-exponent, 1-mantissa float, bitsandbytes' values
  ``(0, 0.0625, 8, 12, 4, 6, 2, 3) / 12`` for codes 0..7 and their negatives for codes
  8..15 (sign bit = 8). Code 8 (the "negative zero") decodes to 0.0 as well.

Quantization picks the nearest code value (bitsandbytes' ``quantize_4bit``):
``q_i = order[#{k : t_k < x_i * (1 / absmax_b)}]`` where ``t_k`` are the 15 float32
midpoints between consecutive code values in increasing order, ``order`` lists the codes
by value, and ``x_i * (1 / absmax_b)`` is clipped to [-1, 1]. A value exactly on a
midpoint goes to the smaller code value. For fp4 the two zeros sit side by side in
``order`` (code 0, then code 8), so with ``t`` half the smallest nonzero magnitude a
value in ``(0, t]`` gets code 8 and one in ``(-t, 0]`` code 0, as in bitsandbytes.

Nibble packing: two codes per byte, the first element of each pair in the high nibble,
``byte_j = (q_{2j} << 4) | q_{2j+1}`` (bitsandbytes' order), so ``codes`` has
``size // 2`` bytes.

Double quantization (QLoRA section 3; bitsandbytes ``compress_statistics=True``)
------------------------------------------------------------------------------------
The float32 absmax values cost 32 bits per block; double quantization stores them in 8:

- ``absmax_offset = mean(absmax)`` (float32; summed in the order torch sums a float32
  vector, see *Exactness*);
- ``d_b = absmax_b - absmax_offset``, cut into groups of ``DOUBLE_QUANT_BLOCK`` = 256
  blocks (the last group may be partial: it covers the remaining blocks only);
- per group ``g``: ``absmax_scale_g = max_{b in g} |d_b|`` and 8-bit codes over
  bitsandbytes' signed dynamic map (``create_dynamic_map()``: 0, 1.0 and
  ``+-10^(e-6) * m`` for the midpoints ``m`` of ``linspace(0.1, 1, 2^e + 1)``,
  ``e = 0..6``; 256 values in [-0.993, 1], in increasing order).

bitsandbytes' CPU quantizer (``quantize_blockwise``) does not search the map exactly: it
reads a 65536-entry table ``LUT[k]`` = nearest map index to the grid point
``-1 + 2k / 65535`` (ties to the smaller value), at
``k = trunc((clip(d_b * (1 / s_g), -1, 1) + 1) * 0.5 * 65535 + 0.5)``, all in float32.
We do the same. A group whose scale is 0 gets codes 0. Since the grid misses 0, a block
whose absmax equals the offset is stored with code 131 (2.1e-5 * scale), not with the
map's zero (code 127).

Dequantized: ``absmax_b = DYN[code_b] * absmax_scale_{b // 256} + absmax_offset``, the
product rounded to float32 before the sum (no fused multiply-add), then as above.

int8
----
Symmetric linear absmax per block, bitsandbytes' row-wise ``int8_vectorwise_quant``
(LLM.int8(), Dettmers et al. 2022) on the array viewed as ``(n_blocks, block_size)``:
``q_i = round(x_i * ((1 / absmax_b) * 127))`` (round half to even; the scale is the float32
reciprocal times 127, as torch evaluates ``127.0 / absmax``), stored as int8; an all-zero
block gets codes 0 (torch turns its 0 * inf = NaN into 0 on x86; we do it explicitly).
Dequantized as bitsandbytes' ``int8_vectorwise_dequant``:
``(q_i * absmax_b) * fl(1/127)``. bitsandbytes has no nested statistics for int8, so
``double_quant=True`` with ``kind="int8"`` is refused (a ValueError).

Parts and memory
----------------
===============  ==========================  ================================================
kind             parts (dtype, shape)         bits per parameter (block B)
===============  ==========================  ================================================
nf4/fp4          codes (uint8, size/2),       4 + 32/B            (B=64: 4.5 bits, 0.5625 B)
                 absmax (float32, n_blocks)
nf4/fp4 + DQ     codes, absmax_codes (uint8,  4 + 8/B + 32/(256 B) (+ 32/size for the
                 n_blocks), absmax_scale      offset); B=64: ~4.127 bits = 0.516 bytes
                 (float32, ceil(n_blocks/256)),
                 absmax_offset (float32, ())
int8             codes (int8, size),          8 + 32/B            (B=64: 8.5 bits, 1.0625 B)
                 absmax (float32, n_blocks)
===============  ==========================  ================================================

:func:`frozen_bytes` gives the exact byte count from the size alone.

Block sizes: nf4/fp4 take bitsandbytes' ``quantize_4bit`` sizes (32, 64, ..., 4096);
int8 any power of two >= 2 (``int8_vectorwise_quant`` takes rows of any length).

Exactness
---------
- Input dtypes: float32, bfloat16 and float16 are widened to float32 exactly (as
  bitsandbytes does); float64 is rounded to float32 first (bitsandbytes refuses it).
- ``absmax_offset`` is the mean as torch computes it on one CPU thread: the cascade sum of
  its float32 ``sum`` kernel (8-lane vectors, 4 at a time, chunked in levels) divided by
  the count. That is bitsandbytes' offset bit for bit when torch sums on one thread
  (fewer than 32768 blocks, or ``torch.set_num_threads(1)``) with 8-lane vectors (its
  AVX2 and default kernels). torch's multi-threaded sum (32768 blocks or more; it
  depends on the thread count) and its AVX-512 kernels (16 lanes) add in other orders:
  the offset may then differ in the last bit or two, and rarely a nested code with it.
- XLA on CPU flushes subnormal floats to zero: a block whose values are all subnormal
  (below 1.2e-38) is stored as an all-zero block, and a subnormal value inside a block
  quantizes as 0 (for fp4: code 0 where bitsandbytes may give code 8; both decode to 0).
- NaN and infinity are not checked (a check would need the data on the host); they give
  meaningless codes.
- The reference is bitsandbytes' CPU backend; its CUDA kernels have their own search
  and reduction code and are not matched bit for bit here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DOUBLE_QUANT_BLOCK",
    "FP4_CODE",
    "KINDS",
    "NF4_CODE",
    "dequantize_blocks",
    "frozen_bytes",
    "quantize_blocks",
]

KINDS = ("nf4", "fp4", "int8")

#: blocks of absmax values that share one nested (double-quantization) scale
DOUBLE_QUANT_BLOCK = 256

# bitsandbytes' 4-bit block sizes (``quantize_4bit``); int8 takes any power of two >= 2
_BLOCK_SIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


#: NormalFloat4 (QLoRA appendix E; bitsandbytes ``get_4bit_type("nf4")``), codes 0..15.
#: Built as ``create_normal_map(offset=0.9677083, use_extra_value=True)``: the N(0, 1)
#: quantiles at ``linspace(offset, 0.5, 9)[:-1]`` (8 positive values) and the negated
#: quantiles at ``linspace(offset, 0.5, 8)[:-1]`` (7 negative values), with 0, sorted
#: and divided by the largest; float32.
NF4_CODE: np.ndarray = _frozen(np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32))

#: bitsandbytes' FP4 (``get_4bit_type("fp4")``): sign bit 8, 2 exponent bits with bias 2,
#: 1 mantissa bit; values ``(0, 0.0625, 8, 12, 4, 6, 2, 3) / 12`` for codes 0..7, negated
#: for codes 8..15 (code 8 decodes to 0.0); float32.
FP4_CODE: np.ndarray = _frozen(
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32)
    / np.float32(12))

# Codes in increasing order of value (what bitsandbytes' argsort of the code book gives:
# for fp4 code 0 before code 8, the two zeros).
_ORDER = {
    "nf4": _frozen(np.arange(16, dtype=np.uint8)),
    "fp4": _frozen(np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)),
}
_CODE = {"nf4": NF4_CODE, "fp4": FP4_CODE}

# The positive values of bitsandbytes' dynamic map, ``create_dynamic_map(signed=True,
# max_exponent_bits=7, total_bits=8)``, one row per decade e = 0..6: 10^(e-6) times the
# 2^e midpoints of linspace(0.1, 1, 2^e + 1), as torch computes them in float32 (its
# linspace rounding included, which is why they are listed rather than recomputed; the
# tests check them against a float64 construction and bitsandbytes).
_DYNAMIC_POSITIVE = (
    (5.5000004e-07,),
    (3.2500002e-06, 7.75e-06),
    (2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05),
    (0.00015625001, 0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006,
     0.00083125, 0.0009437501),
    (0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497,
     0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375,
     0.009156249, 0.00971875),
    (0.01140625, 0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251,
     0.03109375, 0.03390625, 0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875,
     0.05078125, 0.05359375, 0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256,
     0.070468746, 0.07328125, 0.07609375, 0.07890625, 0.08171876, 0.08453125, 0.08734375,
     0.09015625, 0.092968754, 0.09578126, 0.09859375),
    (0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625,
     0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374,
     0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123,
     0.40234375, 0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625, 0.4867187,
     0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313, 0.5710938, 0.58515626,
     0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312, 0.68359375,
     0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
     0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687,
     0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063,
     0.99296874),
)
_POS = np.array([v for row in _DYNAMIC_POSITIVE for v in row], dtype=np.float32)
# bitsandbytes' signed 8-bit dynamic map (256 float32 values in increasing order), the
#: code book of the nested absmax codes
_DYNAMIC_CODE: np.ndarray = _frozen(np.concatenate([-_POS[::-1], [0.0], _POS, [1.0]]).astype(np.float32))
del _POS

_LUT_SIZE = 65536


@functools.cache
def _dynamic_lut() -> np.ndarray:
    """``LUT[k]``: the dynamic-map index nearest to ``-1 + 2k / 65535`` (float32), ties to
    the smaller value: bitsandbytes' CPU ``quantize_blockwise`` table."""
    f32 = np.float32
    code = _DYNAMIC_CODE
    midpoints = (f32(0.5) * (code[:-1] + code[1:])).astype(f32)
    k = np.arange(_LUT_SIZE, dtype=np.float32)
    grid = (f32(-1.0) + (f32(2.0) * k) / f32(_LUT_SIZE - 1)).astype(f32)
    # index = number of midpoints strictly below the grid point
    return _frozen(np.searchsorted(midpoints, grid, side="left").astype(np.uint8))


# --------------------------------------------------------------------------- validation


def _check_kind(kind) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_block_size(kind: str, block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    block_size = int(block_size)
    if kind == "int8":
        if block_size < 2 or block_size & (block_size - 1):
            raise ValueError(f"block_size for int8 must be a power of two >= 2, got {block_size}")
    elif block_size not in _BLOCK_SIZES_4BIT:
        raise ValueError(f"block_size for {kind} must be one of bitsandbytes' {_BLOCK_SIZES_4BIT}, "
                         f"got {block_size}")


def _check_double_quant(kind: str, double_quant) -> None:
    if not isinstance(double_quant, (bool, np.bool_)):
        raise ValueError(f"double_quant must be True or False, got {double_quant!r}")
    if double_quant and kind == "int8":
        raise ValueError("double_quant=True is for nf4/fp4 only: bitsandbytes has no nested statistics "
                         "for int8; pass double_quant=False with kind='int8'")


def _check_size(size: int, block_size: int) -> None:
    if size <= 0:
        raise ValueError(f"cannot quantize an empty array (size {size})")
    if size % block_size:
        raise ValueError(f"size {size} is not a multiple of block_size {block_size}; "
                         f"pick a block size dividing the number of elements")


def _check(kind, block_size, double_quant, size: int) -> None:
    _check_kind(kind)
    _check_block_size(kind, block_size)
    _check_double_quant(kind, double_quant)
    _check_size(size, int(block_size))


# --------------------------------------------------------------------------- float32 helpers


def _rounded(p: jax.Array) -> jax.Array:
    """``p`` as its own float32 value, so that a following ``p + c`` rounds twice as
    bitsandbytes does: under ``jit`` XLA on CPU fuses ``a * b + c`` into one fused
    multiply-add (one rounding). The select on ``isnan(p)`` (identity: NaN stays NaN)
    keeps the product from feeding the add directly."""
    return jnp.where(jnp.isnan(p), jnp.float32(jnp.nan), p)


def _seq_sum(x: jax.Array, axis: int) -> jax.Array:
    """Sum along ``axis`` strictly left to right in float32 (``((x0 + x1) + x2) + ...``);
    zeros when the axis is empty."""
    n = x.shape[axis]
    if n == 0:
        shape = x.shape[:axis] + x.shape[axis + 1:]
        return jnp.zeros(shape, jnp.float32)
    acc = jax.lax.index_in_dim(x, 0, axis, keepdims=False)
    for i in range(1, n):
        acc = acc + jax.lax.index_in_dim(x, i, axis, keepdims=False)
    return acc


def _chunk_sums(rows: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Left-to-right sums of consecutive ``chunk`` rows, and the left-to-right sum of the
    rows left over."""
    full = rows.shape[0] // chunk
    sums = _seq_sum(rows[: full * chunk].reshape((full, chunk) + rows.shape[1:]), 1)
    return sums, _seq_sum(rows[full * chunk:], 0)


def _cascade_sum(rows: jax.Array) -> jax.Array:
    """torch's ``multi_row_sum``: rows summed in 4 levels of chunks of ``2^p`` rows
    (``p = max(4, ceil(log2(n)) // 4)``), each level left to right, then
    ``level0 + level1 + level2 + level3``."""
    n = rows.shape[0]
    p = max(4, (1 if n <= 2 else (n - 1).bit_length()) // 4)
    step = 1 << p
    level1, rest0 = _chunk_sums(rows, step)     # chunks of step rows; rest stays in level 0
    level2, rest1 = _chunk_sums(level1, step)   # chunks of step^2 rows
    level3, rest2 = _chunk_sums(level2, step)   # chunks of step^3 rows
    rest3 = _seq_sum(level3, 0)                 # the top level accumulates without bound
    return ((rest0 + rest1) + rest2) + rest3


def _torch_sum(v: jax.Array) -> jax.Array:
    """Sum of a float32 vector in the order of torch's CPU ``sum`` kernel on one thread
    (``cascade_sum`` / ``vectorized_inner_sum`` with 8-lane vectors, 4 rows at a time)."""
    n = v.shape[0]
    lanes = 8 if n >= 8 else 1
    n_vec = n // lanes
    vecs = v[: n_vec * lanes].reshape(n_vec, lanes)
    n_ilp = n_vec // 4
    partial = _cascade_sum(vecs[: n_ilp * 4].reshape(n_ilp, 4, lanes))  # (4, lanes)
    p0 = partial[0]
    for i in range(n_ilp * 4, n_vec):  # at most 3 vectors
        p0 = p0 + vecs[i]
    for k in range(1, 4):
        p0 = p0 + partial[k]
    if lanes == 1:
        return p0[0]
    total = jnp.float32(0)
    for i in range(n_vec * lanes, n):  # at most 7 scalars
        total = total + v[i]
    for k in range(lanes):
        total = total + p0[k]
    return total


def _torch_mean(v: jax.Array) -> jax.Array:
    """``torch.mean`` of a float32 vector on CPU: ``sum / n``, an IEEE float32 division.

    XLA replaces a division by a constant with a multiplication by its (rounded)
    reciprocal, which is not the same number; a divisor that depends on the data (here
    ``n``, or NaN when the sum is NaN, which gives NaN either way) stays a division."""
    total = _torch_sum(v)
    count = jnp.where(jnp.isnan(total), jnp.float32(jnp.nan), jnp.float32(v.shape[0]))
    return total / count


# --------------------------------------------------------------------------- quantize


def _quantize_dynamic(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' CPU ``quantize_blockwise(v, blocksize=256)`` with its dynamic map:
    8-bit codes ``(len(v),)`` and one float32 scale (absmax) per group of 256 values."""
    n = v.shape[0]
    n_groups = -(-n // DOUBLE_QUANT_BLOCK)
    padded = jnp.pad(v, (0, n_groups * DOUBLE_QUANT_BLOCK - n)).reshape(n_groups, DOUBLE_QUANT_BLOCK)
    scale = jnp.max(jnp.abs(padded), axis=1)  # zero padding never raises a maximum
    inv = jnp.where(scale > 0, 1.0 / scale, 0.0)[:, None]
    val = jnp.clip(padded * inv, -1.0, 1.0)
    # (val + 1) * 0.5 * 65535 + 0.5, truncated: fused (one rounding) or not, the last step
    # gives the same index for every float32 (val + 1) * 0.5 in [0, 1] (checked
    # exhaustively), so it needs no rounding guard
    k = (((val + 1.0) * 0.5) * jnp.float32(_LUT_SIZE - 1) + 0.5).astype(jnp.int32)
    codes = jnp.take(jnp.asarray(_dynamic_lut()), k, mode="clip")
    codes = jnp.where(scale[:, None] > 0, codes, jnp.uint8(0))  # a zero group: codes 0
    return codes.reshape(-1)[:n].astype(jnp.uint8), scale.astype(jnp.float32)


def _nested_quantize(absmax: jax.Array) -> dict[str, jax.Array]:
    """bitsandbytes' ``quantize_4bit(..., compress_statistics=True)`` statistics: the mean
    as offset, then the deviations through ``quantize_blockwise(..., blocksize=256)``."""
    offset = _torch_mean(absmax)
    codes, scale = _quantize_dynamic(absmax - offset)
    return {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": offset.astype(jnp.float32)}


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "double_quant"))
def _quantize(x: jax.Array, kind: str, block_size: int, double_quant: bool) -> dict[str, jax.Array]:
    blocks = x.reshape(-1, block_size).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    if kind == "int8":
        # torch: 127.0 / absmax is absmax.reciprocal() * 127
        scale = (1.0 / absmax) * jnp.float32(127.0)
        q = jnp.round(blocks * scale[:, None])
        q = jnp.where(absmax[:, None] > 0, q, 0.0)
        return {"codes": q.astype(jnp.int8).reshape(-1), "absmax": absmax}
    # torch: A * (1.0 / absmax.clamp(min=1e-38)); an all-zero block scales to 0 either way
    recip = jnp.where(absmax > 0, 1.0 / absmax, 0.0)
    scaled = jnp.clip(blocks * recip[:, None], -1.0, 1.0)
    by_value = _CODE[kind][_ORDER[kind]]
    bounds = (by_value[:-1] + by_value[1:]) / np.float32(2)
    rank = jnp.zeros(scaled.shape, jnp.uint8)
    for t in bounds:  # 15 compares, fused into one pass
        rank = rank + (scaled > t).astype(jnp.uint8)
    q = rank if kind == "nf4" else jnp.take(jnp.asarray(_ORDER[kind]), rank.astype(jnp.int32))
    q = q.reshape(-1)
    packed = (q[0::2] << 4) | q[1::2]
    parts = {"codes": packed.astype(jnp.uint8)}
    if double_quant:
        parts.update(_nested_quantize(absmax))
    else:
        parts["absmax"] = absmax
    return parts


def quantize_blocks(x, kind: str, block_size: int = 64, double_quant: bool = True) -> dict[str, jax.Array]:
    """Quantize ``x`` in blocks of ``block_size`` consecutive elements, as bitsandbytes does.

    ``x`` (any shape, floating dtype; ``x.size % block_size == 0``) is flattened row-major
    and cut into blocks with ``absmax_b = max |x_i|`` over block ``b``:

    - ``nf4``/``fp4`` (QLoRA; bitsandbytes ``quantize_4bit``): the code of the nearest value
      of ``NF4_CODE``/``FP4_CODE`` to ``x_i * (1 / absmax_b)`` (clipped to [-1, 1]; ties to
      the smaller value), two codes per byte, the first in the high nibble.
    - ``int8`` (bitsandbytes ``int8_vectorwise_quant`` on rows of ``block_size``):
      ``round(x_i * ((1 / absmax_b) * 127))``, half to even, as int8.

    With ``double_quant`` (4-bit kinds; bitsandbytes ``compress_statistics=True``) the
    absmax values are stored as 8-bit codes of ``absmax - mean(absmax)`` over the dynamic
    map, in groups of 256 blocks with one float32 scale each (see the module docstring).

    Args:
      x: array-like of float32, bfloat16, float16 (widened exactly) or float64 (rounded
        to float32).
      kind: one of ``KINDS``.
      block_size: elements per block: 32, 64, ..., 4096 for nf4/fp4 (bitsandbytes' sizes),
        any power of two >= 2 for int8.
      double_quant: quantize the absmax values too (nf4/fp4 only; ``True`` with int8 is a
        ValueError).

    Returns:
      ``codes``: uint8 ``(size // 2,)`` for nf4/fp4, int8 ``(size,)`` for int8; then either
      ``absmax`` (float32 ``(n_blocks,)``) or, with ``double_quant``, ``absmax_codes``
      (uint8 ``(n_blocks,)``), ``absmax_scale`` (float32 ``(ceil(n_blocks / 256),)``) and
      ``absmax_offset`` (float32 ``()``).

    Raises:
      ValueError: unknown kind, a block size the kind does not take, double_quant with
        int8, an empty array, a size not divisible by block_size, a non-float dtype.

    Works under ``jit`` (with ``kind``, ``block_size`` and ``double_quant`` static) and
    ``vmap``.
    """
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    _check_kind(kind)
    _check_block_size(kind, block_size)
    _check_double_quant(kind, double_quant)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array (float32, bfloat16, float16), got dtype {dtype}")
    x = jnp.asarray(x)
    _check_size(int(x.size), int(block_size))
    return _quantize(x, kind, int(block_size), bool(double_quant))


# --------------------------------------------------------------------------- dequantize


def _expected_parts(kind: str, double_quant: bool, size: int, block_size: int) -> dict[str, tuple]:
    n_blocks = size // block_size
    codes = (size,) if kind == "int8" else (size // 2,)
    if not double_quant:
        return {"codes": codes, "absmax": (n_blocks,)}
    return {"codes": codes, "absmax_codes": (n_blocks,),
            "absmax_scale": (-(-n_blocks // DOUBLE_QUANT_BLOCK),), "absmax_offset": ()}


def _absmax(parts: dict, n_blocks: int) -> jax.Array:
    """The per-block absmax, undoing the nested quantization if there is one."""
    if "absmax" in parts:
        return jnp.asarray(parts["absmax"]).astype(jnp.float32)
    codes = jnp.asarray(parts["absmax_codes"]).astype(jnp.int32)
    scale = jnp.asarray(parts["absmax_scale"]).astype(jnp.float32)
    offset = jnp.asarray(parts["absmax_offset"]).astype(jnp.float32)
    per_block = jnp.broadcast_to(scale[:, None], (scale.shape[0], DOUBLE_QUANT_BLOCK)).reshape(-1)[:n_blocks]
    return _rounded(jnp.asarray(_DYNAMIC_CODE)[codes] * per_block) + offset


def dequantize_blocks(parts: dict, kind: str, shape: tuple[int, ...], dtype, block_size: int = 64) -> jax.Array:
    """Undo :func:`quantize_blocks`: an array of ``shape`` and ``dtype``.

    Computed in float32, then cast (round to nearest even), as bitsandbytes' CPU
    ``dequantize_4bit`` / ``int8_vectorwise_dequant`` do:

    - nf4/fp4: ``x_i = CODE[q_i] * absmax_b`` with the nibbles read high first;
    - int8: ``x_i = (q_i * absmax_b) * fl(1/127)``;
    - with double quantization (``parts`` has ``absmax_codes``):
      ``absmax_b = DYN[absmax_codes_b] * absmax_scale_{b // 256} + absmax_offset``.

    Pure ``jax.numpy`` (no host callbacks, no loop over blocks): jit-able and vmap-able,
    and XLA can fuse it into the consumer of the result.

    Args:
      parts: the dict :func:`quantize_blocks` returned (double quantization is read from
        its keys).
      kind: one of ``KINDS``.
      shape: shape of the original array.
      dtype: floating dtype of the result.
      block_size: the block size it was quantized with.

    Raises:
      ValueError: unknown kind or block size, a size not divisible by block_size, parts
        missing, extra or of the wrong shape, a non-float dtype.
    """
    _check_kind(kind)
    _check_block_size(kind, block_size)
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape)
    _check_size(size, int(block_size))
    dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    if not isinstance(parts, dict):
        raise ValueError(f"parts must be the dict quantize_blocks returned, got {type(parts).__name__}")
    double_quant = "absmax_codes" in parts
    if double_quant and kind == "int8":
        raise ValueError("parts hold nested (double-quantized) absmax, which int8 does not have")
    expected = _expected_parts(kind, double_quant, size, int(block_size))
    if set(parts) != set(expected):
        raise ValueError(f"parts for {kind} with shape {shape}, block_size {block_size} must have keys "
                         f"{sorted(expected)}, got {sorted(parts)}")
    for name, want in expected.items():
        got = tuple(np.shape(parts[name]))
        if got != want:
            raise ValueError(f"parts[{name!r}] has shape {got}, expected {want} for {kind} with shape {shape}, "
                             f"block_size {block_size}")
    return _dequantize(dict(parts), kind, shape, dtype, int(block_size))


@functools.partial(jax.jit, static_argnames=("kind", "shape", "dtype", "block_size"))
def _dequantize(parts: dict, kind: str, shape: tuple[int, ...], dtype: np.dtype, block_size: int) -> jax.Array:
    n_blocks = math.prod(shape) // block_size
    absmax = _absmax(parts, n_blocks)[:, None]
    codes = parts["codes"]
    if kind == "int8":
        q = codes.astype(jnp.int8).astype(jnp.float32).reshape(n_blocks, block_size)
        out = (q * absmax) * jnp.float32(1.0 / 127.0)
    else:
        codes = codes.astype(jnp.uint8)
        q = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(n_blocks, block_size)
        out = jnp.asarray(_CODE[kind])[q.astype(jnp.int32)] * absmax
    return out.astype(dtype).reshape(shape)


# --------------------------------------------------------------------------- memory


def frozen_bytes(size: int, kind: str, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes the parts of a ``size``-element array take (codes and scales), from the size
    alone: ``size / 2`` (4-bit) or ``size`` (int8) bytes of codes, plus ``4 * n_blocks``
    for float32 absmax, or with double quantization ``n_blocks + 4 * ceil(n_blocks / 256)
    + 4``. NF4 at block 64 with double quantization: about 0.516 bytes per parameter.

    Raises the same ValueErrors as :func:`quantize_blocks` for the arguments.
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an int, got {size!r}")
    _check(kind, block_size, double_quant, int(size))
    expected = _expected_parts(kind, bool(double_quant), int(size), int(block_size))
    itemsize = {"codes": 1, "absmax": 4, "absmax_codes": 1, "absmax_scale": 4, "absmax_offset": 4}
    return sum(itemsize[name] * math.prod(shape) for name, shape in expected.items())
