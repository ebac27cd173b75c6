"""The C kernels (model/matching/native.py) against the torch tiles and the authors' full tensor."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from model.matching import best_matches, mnn_pairs, mnn_scores, native
from model.matching.maps import DenseMaps
from model.matching.native import NATIVE_ENV
from model.matching.precision import Precision

CPU = torch.device("cpu")
X86_WITH_COMPILER = platform.machine() == "x86_64" and shutil.which("cc") is not None


FEATURES = native._cpu_features()
MACHINE = native._machine()


def kernel_param(kernel: native.Kernel):
    """One of the C kernels, run by capping the instruction set at its own (SELAVPR_NATIVE_ISA);
    skipped, saying why, where this machine cannot run it."""
    if kernel.isa not in native.ISA_LEVELS.get(MACHINE, ()):
        reason = f"{kernel.name} is for another architecture than {MACHINE}"
        if kernel.isa in native.ISA_LEVELS["aarch64"]:
            reason += " (checked under qemu: tests/model/test_native_arm.py)"
    else:
        reason = f"this CPU has no {kernel.name}"
    mark = pytest.mark.skipif(
        not FEATURES & kernel.feature or kernel.isa not in native.ISA_LEVELS.get(MACHINE, ()), reason=reason
    )
    return pytest.param(kernel, marks=mark, id=kernel.symbol.removeprefix("selavpr_mnn_"))


# results equal to the tiles' (bfloat16 is float32 matching of rounded maps: tested apart)
EXACT_KERNELS = [kernel_param(k) for k in native.KERNELS if k.precision is not Precision.BFLOAT16]
FLOAT32_KERNELS = [kernel_param(k) for k in native.KERNELS if k.precision is Precision.FLOAT32]
FLOAT32 = pytest.mark.skipif(
    native.kernel_for(Precision.FLOAT32) is None,
    reason="no float32 kernel here (CPU, or SELAVPR_NATIVE_MNN=0)",
)
BF16_AMX = pytest.mark.skipif(not FEATURES & native.CAP_AMX_BF16, reason="no AMX bfloat16 on this CPU")


def use(monkeypatch, kernel: native.Kernel) -> None:
    """Cap the instruction set at `kernel`'s: it is then the one that runs for its precision (with the
    kernels on, even where the suite runs with SELAVPR_NATIVE_MNN=0)."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    monkeypatch.setenv(native.ISA_ENV, kernel.isa)
    monkeypatch.delenv(native.AMX_ENV, raising=False)
    assert native.kernel_for(kernel.precision) == kernel


def unit_maps(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def both_paths(monkeypatch, query, cands, precision):
    """best_matches through the C kernel and through the tiles, on the same maps."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    assert native.native_enabled(CPU, precision, query.shape[-1])
    fast = best_matches(query, DenseMaps(cands), precision, CPU, None)
    monkeypatch.setenv(NATIVE_ENV, "0")
    tiles = best_matches(query, DenseMaps(cands), precision, CPU, None)
    return fast, tiles


@pytest.mark.skipif(not X86_WITH_COMPILER, reason="the kernel is built for x86-64 where a C compiler is")
def test_the_install_built_the_kernel(monkeypatch):
    monkeypatch.setenv(NATIVE_ENV, "1")
    assert native._library() is not None, "pip install -e . should have built model/matching/_mnn_cpu*.so"
    assert native._library().selavpr_mnn_abi() == native.ABI
    assert native.describe().startswith("C kernels: float32") or not FEATURES


@pytest.mark.skipif(not X86_WITH_COMPILER, reason="the kernel is built for x86-64 where a C compiler is")
def test_a_library_from_another_version_is_not_called(monkeypatch, caplog):
    """An editable install whose .so predates a change of the C functions' arguments: refused, logged."""

    class Stale:
        def selavpr_mnn_abi(self) -> int:
            return native.ABI - 1

    monkeypatch.setattr(native.ctypes, "CDLL", lambda path: Stale())
    assert native._library.__wrapped__() is None
    assert "make install" in caplog.text


SHAPES = [  # (query h, w), (candidate h, w), channels: positions and channels off every kernel's grid
    ((5, 7), (3, 7), 24),
    ((20, 30), (17, 19), 64),
    ((6, 6), (5, 5), 22),
    ((1, 1), (1, 3), 4),
    ((9, 11), (13, 2), 130),
]


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
@pytest.mark.parametrize(("q_hw", "c_hw", "channels"), SHAPES)
def test_equals_the_tiles_on_odd_shapes(monkeypatch, kernel, q_hw, c_hw, channels):
    use(monkeypatch, kernel)
    precision = kernel.precision
    query = unit_maps(*q_hw, channels, seed=1)
    cands = unit_maps(5, *c_hw, channels, seed=2)
    positions = c_hw[0] * c_hw[1]
    if q_hw[0] * q_hw[1] >= positions:  # a candidate made of the query's own vectors: mutual matches
        cands[1] = query.reshape(-1, channels)[:positions].reshape(*c_hw, channels)
    fast, tiles = both_paths(monkeypatch, query.reshape(-1, channels), cands, precision)
    assert torch.equal(fast.best_c_of_q, tiles.best_c_of_q)
    assert torch.equal(fast.best_q_of_c, tiles.best_q_of_c)


@BF16_AMX
@pytest.mark.parametrize(("q_hw", "c_hw", "channels"), [*SHAPES, ((61, 61), (61, 61), 128)])
def test_bfloat16_is_float32_matching_of_the_rounded_maps(monkeypatch, q_hw, c_hw, channels):
    """AMX multiplies bfloat16 pairs exactly and sums in float32 in channel order: the argmaxes are
    float32's on the maps rounded to bfloat16 (measured here to the bit; the torch tiles instead round
    each similarity to bfloat16, so theirs differ)."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    monkeypatch.setenv(native.AMX_ENV, "1")
    query = unit_maps(*q_hw, channels, seed=10).reshape(-1, channels).bfloat16().float()
    cands = unit_maps(3, *c_hw, channels, seed=11).bfloat16().float()
    fast = best_matches(query, DenseMaps(cands), Precision.BFLOAT16, CPU, None)
    monkeypatch.setenv(NATIVE_ENV, "0")
    exact = best_matches(query, DenseMaps(cands), Precision.FLOAT32, CPU, None)
    assert torch.equal(fast.best_c_of_q, exact.best_c_of_q)
    assert torch.equal(fast.best_q_of_c, exact.best_q_of_c)


@BF16_AMX
def test_bfloat16_ties_go_to_the_lowest_index(monkeypatch):
    monkeypatch.setenv(NATIVE_ENV, "1")
    gen = torch.Generator().manual_seed(12)
    query = torch.randint(-1, 2, (700, 40), generator=gen).float()  # small integers: exact in bfloat16
    cands = torch.randint(-1, 2, (2, 600, 40), generator=gen).float()
    got = best_matches(query, DenseMaps(cands.reshape(2, 20, 30, 40)), Precision.BFLOAT16, CPU, None)
    sim = torch.matmul(cands, query.T)
    assert torch.equal(got.best_c_of_q, sim.argmax(dim=1))
    assert torch.equal(got.best_q_of_c, sim.argmax(dim=2))


@pytest.mark.parametrize("channels", [128, 384, 1024])
def test_float32_counts_are_the_authors(channels):
    """The authors' way: the whole float32 similarity tensor from torch.matmul, two argmaxes. Where
    torch sums in another order than the kernel (from 768 channels on a Xeon with AMX) the engine
    takes its tiles, whose GEMM is torch's: the counts are the authors' either way."""
    query, cands = unit_maps(17, 19, channels, seed=3), unit_maps(4, 17, 19, channels, seed=4)
    cands[2] = F.normalize(query + 0.8 * cands[2], dim=-1)
    sim = torch.matmul(cands.reshape(4, -1, channels), query.reshape(-1, channels).T)
    back = torch.gather(sim.argmax(dim=2), 1, sim.argmax(dim=1))
    expected = (back == torch.arange(back.shape[1])).sum(dim=1)
    assert mnn_scores(query, cands, "float32").tolist() == expected.tolist()
    assert int(expected.argmax()) == 2  # a real match among them


@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_ties_go_to_the_lowest_index_on_both_sides(monkeypatch, kernel):
    """Coarse values: many exactly equal similarities along rows, columns, and across the threads'
    row ranges and the kernel's query chunks."""
    use(monkeypatch, kernel)
    precision = kernel.precision
    gen = torch.Generator().manual_seed(5)
    query = torch.randint(-1, 2, (700, 8), generator=gen).float()
    cands = torch.randint(-1, 2, (3, 600, 8), generator=gen).float()
    cands[1] = 0  # every similarity 0: all best indices 0
    fast, tiles = both_paths(monkeypatch, query, cands.reshape(3, 20, 30, 8), precision)
    sim = torch.matmul(cands, query.T)
    if precision is Precision.FLOAT32:
        assert torch.equal(fast.best_c_of_q, sim.argmax(dim=1))
        assert torch.equal(fast.best_q_of_c, sim.argmax(dim=2))
    assert torch.equal(fast.best_c_of_q, tiles.best_c_of_q)
    assert torch.equal(fast.best_q_of_c, tiles.best_q_of_c)
    assert fast.best_c_of_q[1].eq(0).all() and fast.best_q_of_c[1].eq(0).all()


@pytest.mark.parametrize("kernel", FLOAT32_KERNELS)
def test_float32_near_ties_and_negative_rows(monkeypatch, kernel):
    """Values one float32 step apart, a lower index holding the smaller one; rows all negative."""
    use(monkeypatch, kernel)
    step = 2.0**-24
    near = torch.tensor([0.5 + step, 0.5 + 2 * step, 0.25]).reshape(1, 3, 1)
    ones = torch.tensor([1.0, -1.0]).reshape(1, 2, 1)
    for query, cands in ((ones, near[None]), (near, ones[None])):
        q_idx, c_idx = mnn_pairs(query, cands[0], "float32")
        sim = cands[0].reshape(-1, 1) @ query.reshape(-1, 1).T
        assert torch.equal(sim.argmax(dim=0)[q_idx], c_idx)
        assert torch.equal(sim.argmax(dim=1)[c_idx], q_idx)


@pytest.mark.parametrize("threads", [1, 3, 64])
@pytest.mark.parametrize("kernel", EXACT_KERNELS)
def test_results_do_not_depend_on_the_threads(monkeypatch, kernel, threads):
    """Candidate rows are split between threads (more threads than rows too); the column bests of the
    ranges are merged keeping the first."""
    use(monkeypatch, kernel)
    precision = kernel.precision
    query, cands = unit_maps(9, 9, 16, seed=6), unit_maps(3, 20, 10, 16, seed=7)
    cands[0, :, :] = cands[0, 0, 0]  # one row repeated: column ties across every range
    monkeypatch.setenv(NATIVE_ENV, "0")
    expected = best_matches(query.reshape(-1, 16), DenseMaps(cands), precision, CPU, None)
    monkeypatch.setenv(NATIVE_ENV, "1")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert len(native._row_ranges(200, threads)) == {1: 1, 3: 3, 64: 5}[threads]  # 48-row multiples
    got = best_matches(query.reshape(-1, 16), DenseMaps(cands), precision, CPU, None)
    assert torch.equal(got.best_c_of_q, expected.best_c_of_q)
    assert torch.equal(got.best_q_of_c, expected.best_q_of_c)


def test_off_switch_and_a_missing_library_fall_back_to_the_tiles(monkeypatch):
    query, cands = unit_maps(6, 6, 16, seed=8), unit_maps(3, 6, 6, 16, seed=9)
    expected = mnn_scores(query, cands, "float32")
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert not native.native_enabled(CPU, Precision.FLOAT32)
    assert mnn_scores(query, cands, "float32").tolist() == expected.tolist()
    monkeypatch.setenv(NATIVE_ENV, "1")
    monkeypatch.setattr(native, "_library", lambda: None)
    assert not native.native_available(Precision.INT8)
    assert mnn_scores(query, cands, "float32").tolist() == expected.tolist()
    assert not native.native_available(Precision.BFLOAT16)
    monkeypatch.undo()
    assert not native.native_available(Precision.FLOAT16)  # no kernel for float16 anywhere
    monkeypatch.setenv(native.AMX_ENV, "0")
    assert not native.native_available(Precision.BFLOAT16)  # bfloat16 only on AMX


@FLOAT32
def test_float32_takes_the_tiles_where_torch_sums_in_another_order(monkeypatch):
    """Where torch.mm sums in another order than the kernel (for some channel count), float32 runs on
    the tiles for that channel count and on the kernel for the others: the counts are the same."""
    query, cands = unit_maps(6, 6, 16, seed=8), unit_maps(3, 6, 6, 16, seed=9)
    expected = mnn_scores(query, cands, "float32")
    monkeypatch.setattr(native, "_float32_matches_torch", lambda channels: channels != 16)
    assert native.native_available(Precision.FLOAT32, 128)
    assert not native.native_available(Precision.FLOAT32, 16)
    assert mnn_scores(query, cands, "float32").tolist() == expected.tolist()


@FLOAT32
def test_a_forked_child_matches_with_its_own_threads():
    """The thread pool does not survive fork(); a child (a pre-forking server's worker) must not wait
    on the parent's threads. (float32 only: torch's own OpenMP ops, such as round_ in quantize_int8,
    can hang in a child forked after the parent ran them in parallel, with or without this kernel.)"""
    import multiprocessing

    query, cands = unit_maps(9, 9, 16, seed=13), unit_maps(3, 9, 9, 16, seed=14)
    expected = mnn_scores(query, cands, "float32")  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        got = pool.apply_async(mnn_scores, (query, cands, "float32")).get(timeout=60)
    assert got.tolist() == expected.tolist()


INT8_KERNELS = [kernel_param(k) for k in native.KERNELS if k.precision is Precision.INT8]


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_int8_extremes_are_exact(monkeypatch, kernel):
    """The largest products int8 allows: candidates at -128 and 127, the query at +-127 (quantize_int8's
    range). AVX2's vpmaddubsw adds pairs of products into int16 with saturation; its operands are
    chosen so that a pair is at most 2 * 128 * 127 = 32512 (see _mnn_cpu.c): every dot product, and
    every best similarity the kernel reports, equals the exact one."""
    use(monkeypatch, kernel)
    gen = torch.Generator().manual_seed(15)
    query = torch.where(torch.rand(45, 64, generator=gen) < 0.5, -127, 127).to(torch.int8)
    cands = torch.where(torch.rand(2, 37, 64, generator=gen) < 0.5, -128, 127).to(torch.int8)
    cands[1, :5] = -128  # with a query vector of +-127: pairs of products at the int16 limit's edge
    query[:3] = -127
    best_c, best_q, best_value = native._run(cands, native._prepare_query(query, Precision.INT8))
    sim = torch.matmul(cands.long(), query.long().T)
    assert torch.equal(best_value.long(), sim.amax(dim=1))
    assert torch.equal(best_c, sim.argmax(dim=1))
    assert torch.equal(best_q, sim.argmax(dim=2))
    assert int(sim.abs().max()) == 64 * 128 * 127  # the extremes were reached


@pytest.mark.skipif(not FEATURES & native.CAP_AVX2, reason="this CPU has no AVX2")
def test_the_avx2_int8_kernel_refuses_a_query_at_minus_128(monkeypatch):
    """q = -128 could saturate vpmaddubsw's pairs (|q * sign(a)| would be 128): refused, not wrong."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    query = torch.full((3, 8), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        native._prepare_query(query, Precision.INT8)


@pytest.mark.skipif(MACHINE != "x86_64", reason="the x86-64 instruction-set levels")
def test_the_instruction_set_cap_chooses_from_one_table(monkeypatch):
    """SELAVPR_NATIVE_ISA caps the kernels; one kernel per precision runs, the first the CPU has."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    monkeypatch.setenv(native.ISA_ENV, "avx9")
    with pytest.raises(ValueError, match="avx2"):
        native.kernel_for(Precision.INT8)
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    table = native.dispatch_table()
    running = [row for row in table if row["runs"]]
    assert all(row["isa"] == "avx2" and row["cpu_has"] for row in running)
    assert not any(row["allowed"] for row in table if row["isa"] in ("avx_vnni", "avx512", "amx", "neon"))
    if FEATURES & native.CAP_AVX2:
        assert {row["precision"] for row in running} == {"float32", "int8"}
        assert native.describe() == "C kernels: float32 on AVX2, int8 on AVX2 (SELAVPR_NATIVE_ISA=avx2)"
    monkeypatch.delenv(native.ISA_ENV)
    monkeypatch.setenv(native.AMX_ENV, "0")  # the older switch: no AMX
    assert native._isa_cap() == "avx512"
    assert not native.amx_enabled()
    monkeypatch.delenv(native.AMX_ENV)
    for precision in (Precision.FLOAT32, Precision.INT8, Precision.BFLOAT16):
        runs = [row for row in native.dispatch_table() if row["runs"] and row["precision"] == str(precision)]
        chosen = native.kernel_for(precision)
        assert [row["kernel"] for row in runs] == ([chosen.name] if chosen else [])
        if chosen:  # the first kernel of its precision that this CPU has
            first = next(k for k in native.KERNELS if k.precision is precision and FEATURES & k.feature)
            assert chosen == first


def torch_quantized(maps: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_int8's elementwise step as torch computes it (the definition the C pass must equal)."""
    scale = scales.view(-1, *([1] * (maps.ndim - 1)))
    return torch.mul(maps, scale).round_().clamp_(-127, 127).to(torch.int8)


@pytest.mark.skipif(native._library() is None, reason="no C library here (not built)")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 61, 61, 128), (1, 300_001), (5, 33)])
def test_quantizing_in_c_gives_the_bits_of_the_torch_passes(monkeypatch, shape, threads):
    """Random values, values exactly half-way between integers once scaled (ties go to even: 2.5 -> 2,
    3.5 -> 4), values past +-127 (clamped), zeros of both signs; maps not a multiple of the vector
    width, and element ranges per thread that split maps."""
    monkeypatch.setenv(NATIVE_ENV, "1")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(threads)
    maps = torch.randn(*shape, generator=gen) * 0.3
    flat = maps.view(-1)
    halves = (torch.arange(-130, 130, dtype=torch.float32) + 0.5)[: maps[0].numel()]
    maps[0].view(-1)[: len(halves)] = halves  # the first map's scale is 1: these stay half-way
    flat[-3:] = torch.tensor([0.0, -0.0, 5.0])
    scales = torch.rand(shape[0], generator=gen) * 300 + 1
    scales[0] = 1.0
    got = native.quantize_int8(maps, scales)
    assert got is not None and got.dtype == torch.int8
    assert torch.equal(got, torch_quantized(maps, scales))
    assert int(got.max()) == 127 and int(got.min()) == -127  # the clamp was exercised


@pytest.mark.skipif(native._library() is None, reason="no C library here (not built)")
def test_quantize_int8_is_the_same_with_the_kernels_off(monkeypatch):
    from model.matching.precision import index_bits
    from model.matching.quantize import quantize_int8

    maps = unit_maps(4, 61 * 61, 128, seed=8)
    monkeypatch.setenv(NATIVE_ENV, "1")
    fast = quantize_int8(maps, index_bits(3721))
    monkeypatch.setenv(NATIVE_ENV, "0")
    assert native.quantize_int8(maps, torch.ones(4)) is None
    assert torch.equal(fast, quantize_int8(maps, index_bits(3721)))
