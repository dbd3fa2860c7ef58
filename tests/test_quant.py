"""jpeft.quant: blockwise NF4/FP4/int8 kernels against their definitions (float64 code
books, error bounds, byte counts) and bit for bit against bitsandbytes' CPU backend.

The parity tests take torch and bitsandbytes from the ``bnb`` fixture, so only they skip
when those are missing."""

import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import quant

# (shape, block_size): 36 blocks (one partial group of 256 for the nested statistics),
# 320 blocks (a full group and a partial one), 18 blocks, 72 blocks
CONFIGS = [((24, 96), 64), ((160, 128), 64), ((24, 96), 128), ((24, 96), 32)]


def _inputs(shape, block_size, seed=0):
    """A standard normal matrix and a heavy-tailed one (Student-t, 2 degrees of freedom,
    with a few outliers); both with an all-zero first block."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal(shape).astype(np.float32)
    heavy = rng.standard_t(2, shape).astype(np.float32)
    heavy.flat[rng.choice(heavy.size, 4, replace=False)] *= 40.0
    for x in (normal, heavy):
        x.reshape(-1)[:block_size] = 0.0
    return {"normal": normal, "student_t2": heavy}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def _block_absmax(x, block_size):
    return np.abs(np.asarray(x, np.float32).reshape(-1, block_size)).max(axis=1)


# --------------------------------------------------------------------------- code books


def test_nf4_code_is_the_normal_quantile_construction():
    """QLoRA's NF4 (appendix E; bitsandbytes ``create_normal_map(0.9677083, True)``) in
    float64: N(0,1) quantiles at linspace(offset, 0.5, 9)[:-1], the negated quantiles at
    linspace(offset, 0.5, 8)[:-1], and 0, normalized by the largest. bitsandbytes takes the
    quantile points from a float32 linspace and rounds to float32, hence ~1 ulp apart."""
    offset = 0.9677083
    ppf = NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative))
    values /= values.max()
    assert quant.NF4_CODE.dtype == np.float32 and quant.NF4_CODE.shape == (16,)
    np.testing.assert_allclose(quant.NF4_CODE, values, rtol=0, atol=2.5e-7)
    assert quant.NF4_CODE[7] == 0.0 and quant.NF4_CODE[0] == -1.0 and quant.NF4_CODE[15] == 1.0
    assert np.all(np.diff(quant.NF4_CODE) > 0)  # codes 0..15 in increasing order


def test_fp4_code_is_sign_exponent_mantissa():
    """Code bits ``s ee m``: bitsandbytes' FP4 magnitudes, ``2^(4-e) (1 + m/2)`` for e > 0
    and ``m / 16`` for e = 0, over 12 (its largest), sign bit 8."""
    values = []
    for c in range(16):
        sign, e, m = c >> 3, (c >> 1) & 3, c & 1
        magnitude = m / 16 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)
        values.append((-1) ** sign * magnitude / 12)
    assert quant.FP4_CODE.dtype == np.float32
    np.testing.assert_array_equal(quant.FP4_CODE, np.array(values, np.float32))


def test_dynamic_map_construction():
    """The nested statistics' code book: 0, 1 and +-10^(e-6) times the midpoints of
    linspace(0.1, 1, 2^e + 1), e = 0..6 (float64 here; float32 in bitsandbytes)."""
    values = [0.0, 1.0]
    for e in range(7):
        b = np.linspace(0.1, 1.0, 2**e + 1)
        mid = 10.0 ** (e - 6) * (b[:-1] + b[1:]) / 2
        values += list(mid) + list(-mid)
    values = np.sort(values)
    code = quant._DYNAMIC_CODE
    assert code.shape == (256,) and code.dtype == np.float32 and np.all(np.diff(code) > 0)
    np.testing.assert_allclose(code, values, rtol=2.5e-7, atol=0)


# --------------------------------------------------------------------------- layout and bounds


def test_parts_layout_and_nibble_order():
    x = np.zeros((2, 64), np.float32)
    x[0, 0], x[0, 1] = 1.0, -1.0      # nf4 codes 15, 0
    x[1, 0], x[1, 1] = -0.5, 2.0      # in block 1 (absmax 2): -0.25, 1.0
    p = quant.quantize_blocks(x, "nf4", 64, double_quant=False)
    assert set(p) == {"codes", "absmax"}
    assert p["codes"].dtype == jnp.uint8 and p["codes"].shape == (64,)
    assert p["absmax"].dtype == jnp.float32 and p["absmax"].shape == (2,)
    codes = np.asarray(p["codes"])
    assert codes[0] == 0xF0                      # first element in the high nibble
    assert codes[1] == 0x77                      # two zeros (nf4 code 7)
    assert codes[32] == (4 << 4) | 15            # -0.25 -> -0.2844 (code 4); 1.0 -> code 15
    np.testing.assert_array_equal(np.asarray(p["absmax"]), [1.0, 2.0])

    p = quant.quantize_blocks(np.ones((600, 64), np.float32) * np.arange(1, 601)[:, None], "fp4", 64)
    assert {k: (v.dtype, v.shape) for k, v in p.items()} == {
        "codes": (jnp.uint8, (600 * 32,)), "absmax_codes": (jnp.uint8, (600,)),
        "absmax_scale": (jnp.float32, (3,)), "absmax_offset": (jnp.float32, ())}

    p = quant.quantize_blocks(x, "int8", 64, double_quant=False)
    assert {k: (v.dtype, v.shape) for k, v in p.items()} == {
        "codes": (jnp.int8, (128,)), "absmax": (jnp.float32, (2,))}
    assert np.asarray(p["codes"])[:2].tolist() == [127, -127]


@pytest.mark.parametrize("kind,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True),
                                               ("int8", False)])
def test_roundtrip_error_bound(kind, double_quant):
    """Nearest-code rounding: |x - x^| <= (largest code gap / 2) * absmax_b per block (plus
    float32 rounding). With double quantization x^ uses the decoded absmax^_b, so the
    bound is (gap / 2) * absmax_b + |absmax_b - absmax^_b|, and the nested error is itself
    at most (largest dynamic-map gap / 2 + half the 2/65535 grid step) * scale_g."""
    block = 64
    for x in _inputs((24, 96), block, seed=1).values():
        p = quant.quantize_blocks(x, kind, block, double_quant)
        xhat = np.asarray(quant.dequantize_blocks(p, kind, x.shape, jnp.float32, block), np.float64)
        absmax = _block_absmax(x, block).astype(np.float64)
        if kind == "int8":
            half_gap = 0.5 / 127
        else:
            half_gap = np.diff(np.sort(quant.NF4_CODE if kind == "nf4" else quant.FP4_CODE)).max() / 2
        nested = np.zeros_like(absmax)
        if double_quant:
            decoded = np.asarray(jax.jit(quant._absmax, static_argnums=1)(p, absmax.size), np.float64)
            nested = np.abs(absmax - decoded)
            scale = np.repeat(np.asarray(p["absmax_scale"], np.float64), 256)[: absmax.size]
            dyn_half_gap = np.diff(quant._DYNAMIC_CODE.astype(np.float64)).max() / 2
            assert np.all(nested <= scale * (dyn_half_gap + 1 / 65535) * (1 + 1e-6) + 1e-6 * np.abs(absmax))
        err = np.abs(x.astype(np.float64) - xhat).reshape(-1, block).max(axis=1)
        bound = half_gap * absmax + nested
        assert np.all(err <= bound * (1 + 1e-6) + 1e-7 * absmax), (err - bound).max()
        assert np.all(xhat.reshape(-1)[:block] == 0.0)  # the all-zero block stays zero


def test_dequantize_under_jit_equals_unjitted():
    """Bit for bit, jitted (XLA fuses, and would fuse code * scale + offset into one FMA)
    against op by op; nf4 with double quantization (the path with an add)."""
    x = _inputs((24, 96), 64, seed=2)["student_t2"]
    p = quant.quantize_blocks(x, "nf4", 64, True)
    jitted = jax.jit(lambda parts: quant.dequantize_blocks(parts, "nf4", x.shape, jnp.float32, 64))(p)
    with jax.disable_jit():
        eager = quant.dequantize_blocks(p, "nf4", x.shape, jnp.float32, 64)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    bf16 = quant.dequantize_blocks(p, "nf4", x.shape, jnp.bfloat16, 64)
    assert bf16.dtype == jnp.bfloat16 and bf16.shape == x.shape
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(eager).astype(jnp.bfloat16))


def test_quantize_under_jit_and_vmap():
    xs = np.random.default_rng(3).standard_normal((3, 24, 96)).astype(np.float32)
    one = quant.quantize_blocks(xs[1], "nf4", 64)
    jitted = jax.jit(lambda x: quant.quantize_blocks(x, "nf4", 64))(xs[1])
    stacked = jax.vmap(lambda x: quant.quantize_blocks(x, "nf4", 64))(xs)
    for k in one:
        np.testing.assert_array_equal(np.asarray(jitted[k]), np.asarray(one[k]))
        np.testing.assert_array_equal(np.asarray(stacked[k][1]), np.asarray(one[k]))
    back = jax.vmap(lambda p: quant.dequantize_blocks(p, "nf4", (24, 96), jnp.float32, 64))(stacked)
    np.testing.assert_array_equal(np.asarray(back[1]), np.asarray(quant.dequantize_blocks(one, "nf4", (24, 96),
                                                                                           jnp.float32, 64)))


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("kind,block,dq", [("nf4", 64, True), ("nf4", 64, False), ("fp4", 128, True),
                                           ("fp4", 32, False), ("int8", 64, False), ("int8", 2, False)])
def test_frozen_bytes_is_the_parts_nbytes(kind, block, dq):
    """Against the parts' shapes and dtypes (traced, not computed) for sizes with one
    block, a full nested group, a partial one, several groups."""
    for size in (block, 256 * block, 257 * block, 600 * block + 24 * 96 * 4):
        if size % block:
            continue
        parts = jax.eval_shape(lambda x: quant.quantize_blocks(x, kind, block, dq),
                               jax.ShapeDtypeStruct((size,), jnp.bfloat16))
        nbytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in parts.values())
        assert quant.frozen_bytes(size, kind, block, dq) == nbytes
    x = np.linspace(-1, 1, 3 * block, dtype=np.float32)  # and one computed
    assert quant.frozen_bytes(x.size, kind, block, dq) == sum(v.nbytes for v in quant.quantize_blocks(
        x, kind, block, dq).values())


def test_nf4_double_quant_bytes_per_parameter():
    size = 2048 * 2048
    got = quant.frozen_bytes(size, "nf4", 64, True)
    assert got / size <= 0.53
    bits = 4 + 8 / 64 + 32 / (64 * 256)          # ~4.127 bits
    assert got == size * bits / 8 + 4             # + the float32 offset
    assert quant.frozen_bytes(size, "nf4", 64, False) == size * (4 + 32 / 64) / 8
    assert quant.frozen_bytes(size, "int8", 64, False) == size * (8 + 32 / 64) / 8


# --------------------------------------------------------------------------- bad input


def test_bad_input():
    x = np.zeros((4, 64), np.float32)
    with pytest.raises(ValueError, match=r"kind must be one of \('nf4', 'fp4', 'int8'\), got 'nf2'"):
        quant.quantize_blocks(x, "nf2")
    with pytest.raises(ValueError, match=r"block_size for nf4 must be one of bitsandbytes' \(32, 64.*got 16"):
        quant.quantize_blocks(x, "nf4", 16)
    with pytest.raises(ValueError, match=r"block_size for fp4 must be one of .*got 8192"):
        quant.frozen_bytes(8192 * 2, "fp4", 8192)
    with pytest.raises(ValueError, match=r"block_size for int8 must be a power of two >= 2, got 48"):
        quant.quantize_blocks(x, "int8", 48, double_quant=False)
    with pytest.raises(ValueError, match=r"block_size must be an int, got 64.0"):
        quant.quantize_blocks(x, "nf4", 64.0)
    with pytest.raises(ValueError, match=r"double_quant=True is for nf4/fp4 only.*int8"):
        quant.quantize_blocks(x, "int8")
    with pytest.raises(ValueError, match=r"double_quant=True is for nf4/fp4 only"):
        quant.frozen_bytes(256, "int8", 64)
    with pytest.raises(ValueError, match=r"size 96 is not a multiple of block_size 64"):
        quant.quantize_blocks(np.zeros((3, 32), np.float32), "nf4", 64)
    with pytest.raises(ValueError, match=r"empty array"):
        quant.quantize_blocks(np.zeros((0, 64), np.float32), "nf4", 64)
    with pytest.raises(ValueError, match=r"floating-point array .* got dtype int32"):
        quant.quantize_blocks(np.zeros((4, 64), np.int32), "nf4", 64)
    parts = quant.quantize_blocks(x, "nf4", 64)
    with pytest.raises(ValueError, match=r"must have keys \['absmax', 'codes'\]"):
        quant.dequantize_blocks({"codes": parts["codes"]}, "nf4", x.shape, jnp.float32, 64)
    with pytest.raises(ValueError, match=r"parts\['codes'\] has shape \(128,\), expected \(64,\)"):
        quant.dequantize_blocks(parts, "nf4", (2, 64), jnp.float32, 64)
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype, got int8"):
        quant.dequantize_blocks(parts, "nf4", x.shape, jnp.int8, 64)


# --------------------------------------------------------------------------- bitsandbytes parity


@pytest.fixture(scope="module")
def bnb():
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return torch, F


def _bnb_dequantize(F, torch, q, state, size):
    """bitsandbytes' dequantization through a flat shape: its AVX-512 CPU kernel indexes
    absmax per row, which assumes rows of whole blocks (a (24, 96) matrix at block 64 has
    none); flat, every CPU kernel takes the same blocks."""
    state.shape = torch.Size([size])
    return F.dequantize_4bit(q, state)


def _assert_parts_equal_bnb(parts, q, state, double_quant):
    np.testing.assert_array_equal(np.asarray(parts["codes"]), q.numpy().reshape(-1))
    if double_quant:
        np.testing.assert_array_equal(np.asarray(parts["absmax_codes"]), state.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(parts["absmax_scale"]), state.state2.absmax.numpy())
        np.testing.assert_array_equal(np.asarray(parts["absmax_offset"]), state.offset.numpy())
    else:
        np.testing.assert_array_equal(np.asarray(parts["absmax"]), state.absmax.numpy())


def test_code_books_equal_bitsandbytes(bnb):
    torch, F = bnb
    np.testing.assert_array_equal(quant.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(quant.FP4_CODE, F.get_4bit_type("fp4", device="cpu").numpy())
    np.testing.assert_array_equal(quant._DYNAMIC_CODE, F.create_dynamic_map().numpy())


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,block_size", CONFIGS, ids=[f"{s[0]}x{s[1]}-b{b}" for s, b in CONFIGS])
def test_4bit_parity(bnb, kind, double_quant, shape, block_size):
    torch, F = bnb
    for name, x in _inputs(shape, block_size).items():
        q, state = F.quantize_4bit(torch.tensor(x), blocksize=block_size, quant_type=kind,
                                   compress_statistics=double_quant)
        parts = quant.quantize_blocks(x, kind, block_size, double_quant)
        _assert_parts_equal_bnb(parts, q, state, double_quant)
        ref = _bnb_dequantize(F, torch, q, state, x.size).reshape(shape).numpy()
        ours = np.asarray(quant.dequantize_blocks(parts, kind, shape, jnp.float32, block_size))
        assert _rel_err(ours, ref) <= 1e-6, name


@pytest.mark.parametrize("kind,dtype", [("nf4", "bfloat16"), ("fp4", "bfloat16"), ("nf4", "float16")])
def test_4bit_parity_half_precision(bnb, kind, dtype):
    torch, F = bnb
    x = _inputs((160, 128), 64, seed=4)["student_t2"]
    xt = torch.tensor(x).to(getattr(torch, dtype))
    xj = jnp.asarray(x).astype(getattr(jnp, dtype))
    q, state = F.quantize_4bit(xt, blocksize=64, quant_type=kind, compress_statistics=True)
    parts = quant.quantize_blocks(xj, kind, 64, True)
    _assert_parts_equal_bnb(parts, q, state, True)
    ref = _bnb_dequantize(F, torch, q, state, x.size).reshape(x.shape).float().numpy()
    ours = quant.dequantize_blocks(parts, kind, x.shape, xj.dtype, 64)
    assert ours.dtype == xj.dtype
    assert _rel_err(np.asarray(ours.astype(jnp.float32)), ref) <= 1e-6


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_ties_match_bitsandbytes(bnb, kind):
    """Values exactly on the midpoints between code values (they go to the smaller value),
    +-0 and tiny values around fp4's two zeros (codes 0 and 8)."""
    torch, F = bnb
    by_value = np.sort(quant.NF4_CODE if kind == "nf4" else quant.FP4_CODE)
    mid = (by_value[:-1] + by_value[1:]) / np.float32(2)
    special = [1.0, 0.0, -0.0, 1e-3, -1e-3, 1e-30, -1e-30, np.nextafter(np.float32(0), np.float32(1)) * 2**30]
    x = np.concatenate([special, mid, -mid, np.nextafter(mid, 2), np.nextafter(mid, -2)]).astype(np.float32)
    # no subnormals: XLA on CPU reads them as 0 (documented), bitsandbytes does not
    x = x[(x == 0) | (np.abs(x) >= np.finfo(np.float32).tiny)]
    x = np.concatenate([x, np.zeros(-x.size % 64, np.float32)])
    q, state = F.quantize_4bit(torch.tensor(x), blocksize=64, quant_type=kind)
    parts = quant.quantize_blocks(x, kind, 64, double_quant=False)
    _assert_parts_equal_bnb(parts, q, state, False)


def test_nested_quantizer_matches_quantize_blockwise(bnb):
    """The 8-bit dynamic quantizer of the nested statistics against bitsandbytes' CPU
    ``quantize_blockwise(blocksize=256)`` (a 65536-point table, not an exact search):
    random groups, a partial last group, an all-zero group, exact +-max and 0 (code 131)."""
    torch, F = bnb
    rng = np.random.default_rng(5)
    v = rng.standard_normal(256 * 3 + 77).astype(np.float32) * np.float32(0.3)
    v[256:512] = 0.0
    v[512:520] = [0.0, 1.0, -1.0, 0.5, -0.5, 1e-6, -1e-6, 0.999]
    v[600] = 2.0
    codes, scale = jax.jit(quant._quantize_dynamic)(jnp.asarray(v))
    q, state = F.quantize_blockwise(torch.tensor(v), blocksize=256)
    np.testing.assert_array_equal(np.asarray(codes), q.numpy())
    np.testing.assert_array_equal(np.asarray(scale), state.absmax.numpy())
    assert np.asarray(codes)[512] == 131 and np.all(np.asarray(codes)[256:512] == 0)
    # and decoded as bitsandbytes decodes
    parts = {"absmax_codes": codes, "absmax_scale": scale, "absmax_offset": jnp.float32(0)}
    np.testing.assert_array_equal(np.asarray(jax.jit(quant._absmax, static_argnums=1)(parts, v.size)),
                                  F.dequantize_blockwise(q, state).numpy())


def test_offset_is_torch_mean(bnb):
    """The offset's float32 sum order is torch's (one thread): every length class of its
    cascade (scalar path, vector tail, 4-row blocks, several levels, > 32768 elements)."""
    torch, F = bnb
    rng = np.random.default_rng(6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in (5, 13, 36, 320, 4099, 40000):
            v = np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(rng.uniform(0.5, 3))
            ours = jax.jit(quant._torch_mean)(jnp.asarray(v))
            assert np.asarray(ours) == torch.tensor(v).mean().numpy(), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape,block_size,dtype", [((24, 96), 64, "float32"), ((24, 96), 64, "bfloat16"),
                                                     ((16, 64), 2, "float32"), ((8, 512), 256, "bfloat16")])
def test_int8_parity(bnb, shape, block_size, dtype):
    torch, F = bnb
    for name, x in _inputs(shape, block_size, seed=7).items():
        xt = torch.tensor(x).to(getattr(torch, dtype))
        xj = jnp.asarray(x).astype(getattr(jnp, dtype))
        codes, stats, _ = F.int8_vectorwise_quant(xt.reshape(-1, block_size).clone())
        parts = quant.quantize_blocks(xj, "int8", block_size, double_quant=False)
        np.testing.assert_array_equal(np.asarray(parts["codes"]), codes.numpy().reshape(-1))
        np.testing.assert_array_equal(np.asarray(parts["absmax"]), stats.numpy())
        assert np.all(np.asarray(parts["codes"])[:block_size] == 0)  # the all-zero block
        ref = F.int8_vectorwise_dequant(codes, stats).numpy().reshape(shape)
        ours = np.asarray(quant.dequantize_blocks(parts, "int8", shape, jnp.float32, block_size))
        assert _rel_err(ours, ref) <= 1e-6, name
