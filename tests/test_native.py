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


CAPS = native._caps()


def kernel_param(precision: Precision, cap: int, amx: bool, name: str):
    """One of the C kernels, skipped where the CPU lacks its instructions."""
    mark = pytest.mark.skipif(not CAPS & cap, reason=f"this CPU has no {name} kernel")
    return pytest.param(precision, "1" if amx else "0", marks=mark, id=name)


EXACT_KERNELS = [  # results equal to the tiles'
    kernel_param(Precision.FLOAT32, native.CAP_FLOAT32, False, "float32"),
    kernel_param(Precision.INT8, native.CAP_INT8, False, "int8-vnni"),
    kernel_param(Precision.INT8, native.CAP_INT8_AMX, True, "int8-amx"),
]
FLOAT32 = pytest.mark.skipif(not CAPS & native.CAP_FLOAT32, reason="no float32 kernel here")
BF16_AMX = pytest.mark.skipif(not CAPS & native.CAP_BF16_AMX, reason="no AMX bfloat16 here")


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
def test_the_install_built_the_kernel():
    assert native._library() is not None, "pip install -e . should have built model/matching/_mnn_cpu*.so"
    assert native._library().selavpr_mnn_abi() == native.ABI
    assert native.describe().startswith("C kernels: float32") or not CAPS


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


@pytest.mark.parametrize(("precision", "amx"), EXACT_KERNELS)
@pytest.mark.parametrize(("q_hw", "c_hw", "channels"), SHAPES)
def test_equals_the_tiles_on_odd_shapes(monkeypatch, precision, amx, q_hw, c_hw, channels):
    monkeypatch.setenv(native.AMX_ENV, amx)
    assert native.amx_enabled() == (amx == "1") or precision is Precision.FLOAT32
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


@pytest.mark.parametrize(("precision", "amx"), EXACT_KERNELS)
def test_ties_go_to_the_lowest_index_on_both_sides(monkeypatch, precision, amx):
    """Coarse values: many exactly equal similarities along rows, columns, and across the threads'
    row ranges and the kernel's query chunks."""
    monkeypatch.setenv(native.AMX_ENV, amx)
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


@FLOAT32
def test_float32_near_ties_and_negative_rows():
    """Values one float32 step apart, a lower index holding the smaller one; rows all negative."""
    step = 2.0**-24
    near = torch.tensor([0.5 + step, 0.5 + 2 * step, 0.25]).reshape(1, 3, 1)
    ones = torch.tensor([1.0, -1.0]).reshape(1, 2, 1)
    for query, cands in ((ones, near[None]), (near, ones[None])):
        q_idx, c_idx = mnn_pairs(query, cands[0], "float32")
        sim = cands[0].reshape(-1, 1) @ query.reshape(-1, 1).T
        assert torch.equal(sim.argmax(dim=0)[q_idx], c_idx)
        assert torch.equal(sim.argmax(dim=1)[c_idx], q_idx)


@pytest.mark.parametrize("threads", [1, 3, 64])
@pytest.mark.parametrize(("precision", "amx"), EXACT_KERNELS)
def test_results_do_not_depend_on_the_threads(monkeypatch, precision, amx, threads):
    """Candidate rows are split between threads (more threads than rows too); the column bests of the
    ranges are merged keeping the first."""
    monkeypatch.setenv(native.AMX_ENV, amx)
    query, cands = unit_maps(9, 9, 16, seed=6), unit_maps(3, 7, 9, 16, seed=7)
    cands[0, :, :] = cands[0, 0, 0]  # one row repeated: column ties across every range
    expected = best_matches(query.reshape(-1, 16), DenseMaps(cands), precision, CPU, None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
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
