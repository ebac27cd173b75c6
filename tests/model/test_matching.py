"""MNN counts (spec section 5) against the literal definition, tiling, ties and the one-match quirk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.matching import (
    Precision,
    default_precision,
    defaults,
    kernels,
    mnn_pairs,
    mnn_scores,
    mnn_scores_detailed,
    native,
    rerank_order,
)
from model.matching.native import NATIVE_ENV
from model.matching.refine import RecountPolicy, refine, refine_candidates
from tests.reference import mnn_count_reference

EXACT = "float32"
ALL_PRECISIONS = [p.value for p in Precision]


def unit_maps(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def full_tensor_counts(query: torch.Tensor, cands: torch.Tensor) -> list[int]:
    """The authors' way in float32: the whole (K, L, L) similarity tensor at once."""
    q = query.reshape(-1, query.shape[-1])
    c = cands.reshape(cands.shape[0], -1, cands.shape[-1])
    sim = torch.matmul(c, q.T)
    best_c_of_q = sim.argmax(dim=1)
    best_q_of_c = sim.argmax(dim=2)
    back = torch.gather(best_q_of_c, 1, best_c_of_q)
    return (back == torch.arange(q.shape[0])).sum(dim=1).tolist()


@pytest.mark.parametrize("tile_elements", [37, 1000, 4 * 1024 * 1024])
def test_random_maps_match_the_definition(tile_elements):
    query, cands = unit_maps(9, 9, 16, seed=1), unit_maps(7, 9, 9, 16, seed=2)
    ours = mnn_scores(query, cands, EXACT, tile_elements=tile_elements)
    assert ours.dtype == torch.int64 and ours.shape == (7,)
    assert ours.tolist() == [mnn_count_reference(query.numpy(), c) for c in cands.numpy()]


def test_realistic_size_equals_full_tensor_float32():
    """61 x 61 x 128 maps, several tiles per candidate: identical to the full-tensor float32 counts."""
    query, cands = unit_maps(61, 61, 128, seed=3), unit_maps(3, 61, 61, 128, seed=4)
    cands[1] = F.normalize(query + 0.3 * cands[1], dim=-1)  # a related candidate: many matches
    ours = mnn_scores(query, cands, EXACT, tile_elements=500_000)
    assert ours.tolist() == full_tensor_counts(query, cands)
    assert ours[1] > 3000 > ours[0]


def test_different_map_sizes_for_query_and_candidates():
    query, cands = unit_maps(5, 5, 8, seed=5), unit_maps(4, 7, 3, 8, seed=6)
    expected = [mnn_count_reference(query.numpy(), c) for c in cands.numpy()]
    assert mnn_scores(query, cands, EXACT).tolist() == expected


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_identical_and_permuted_maps_match_everywhere(precision):
    query = unit_maps(6, 6, 32, seed=7)
    perm = torch.randperm(36, generator=torch.Generator().manual_seed(0))
    shuffled = query.reshape(36, 32)[perm].reshape(6, 6, 32)
    assert mnn_scores(query, torch.stack([query, shuffled]), precision).tolist() == [36, 36]
    q_idx, c_idx = mnn_pairs(query, shuffled, precision)
    assert torch.equal(perm[c_idx], q_idx)  # every match pairs a position with its own vector


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_ties_go_to_the_lowest_index(precision):
    """One-hot maps: many exact ties (exact in every precision). The first maximum wins on both sides,
    as torch.argmax decides."""
    eye = torch.eye(4)
    query = eye[[0, 1, 1, 2]].reshape(2, 2, 4)  # query positions 1 and 2 are the same vector
    cand = eye[[1, 1, 0, 3]].reshape(1, 2, 2, 4)  # candidate positions 0 and 1 are the same vector
    # q0 -> c2 -> q0: mutual. q1 -> c0 -> q1: mutual. q2 -> c0 -> q1 != q2. q3 (e2): all zero -> c0 -> q1.
    assert mnn_scores(query, cand, precision).tolist() == [2]
    assert mnn_count_reference(query.numpy(), cand[0].numpy()) == 2
    q_idx, c_idx = mnn_pairs(query, cand[0], precision)
    assert q_idx.tolist() == [0, 1] and c_idx.tolist() == [2, 0]


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_ties_across_tiles_keep_the_lowest_index(precision):
    """A tie between candidate positions that fall in different tiles resolves like one argmax."""
    query = unit_maps(1, 4, 8, seed=8)
    cand = torch.cat([unit_maps(1, 4, 8, seed=9), query, query], dim=1)  # positions 4..7 == 8..11
    counts = [mnn_scores(query, cand[None], precision, tile_elements=t).item() for t in (4, 16, 48, 10_000)]
    assert counts == [4, 4, 4, 4]
    _, c_idx = mnn_pairs(query, cand, precision, tile_elements=4)
    assert c_idx.tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_exactly_one_match_quirk(precision):
    """All-zero maps tie everywhere: only position 0 is mutual. The authors score that as 0."""
    query, cands = torch.zeros(3, 3, 4), torch.zeros(2, 3, 3, 4)
    assert mnn_scores(query, cands, precision).tolist() == [1, 1]
    assert mnn_scores(query, cands, precision, reference_compatible=True).tolist() == [0, 0]
    two = unit_maps(2, 2, 4, seed=10)
    assert mnn_scores(two, two[None], precision, reference_compatible=True).tolist() == [4]


@pytest.mark.parametrize("int8_route", ["int", "float"])
def test_never_builds_the_whole_similarity_tensor(monkeypatch, int8_route):
    query, cands = unit_maps(20, 20, 16, seed=11), unit_maps(10, 20, 20, 16, seed=12)
    largest = []

    def spying(real):
        def spy(*args):
            out = real(*args)
            largest.append(out.numel())
            return out

        return spy

    monkeypatch.setenv(NATIVE_ENV, "0")  # the tiles (the C kernel never holds a tile in memory)
    monkeypatch.setenv(kernels.INT8_ROUTE_ENV, int8_route)
    monkeypatch.setattr(kernels, "_onednn_float32_works", lambda channels: False)  # plain torch GEMMs, spied
    for name in ("matmul", "addmm", "_int_mm"):
        monkeypatch.setattr(torch, name, spying(getattr(torch, name)))
    exact = mnn_scores(query, cands, EXACT, tile_elements=20_000)
    int8 = mnn_scores(query, cands, "int8", tile_elements=20_000)
    monkeypatch.undo()
    assert len(largest) > 20 and max(largest) <= 20_000 < 10 * 400 * 400
    assert exact.tolist() == full_tensor_counts(query, cands)
    assert int8.tolist() == mnn_scores(query, cands, "int8").tolist()


def test_numpy_inputs_and_empty_candidates():
    query, cands = unit_maps(4, 4, 8, seed=13), unit_maps(3, 4, 4, 8, seed=14)
    assert mnn_scores(query.numpy(), cands.numpy()).tolist() == mnn_scores(query, cands).tolist()
    assert mnn_scores(query, cands[:0]).shape == (0,)


def test_float16_inputs_are_computed_in_float32():
    query, cands = unit_maps(6, 6, 16, seed=15), unit_maps(2, 6, 6, 16, seed=16)
    half = mnn_scores(query.half(), cands.half(), EXACT)
    assert half.tolist() == full_tensor_counts(query.half().float(), cands.half().float())


def test_pairs_agree_with_counts_and_are_mutual():
    query, cands = unit_maps(8, 8, 16, seed=17), unit_maps(3, 8, 8, 16, seed=18)
    counts = mnn_scores(query, cands, EXACT)
    for cand, count in zip(cands, counts, strict=True):
        q_idx, c_idx = mnn_pairs(query, cand, EXACT)
        assert len(q_idx) == count
        sim = cand.reshape(64, 16) @ query.reshape(64, 16).T
        assert torch.equal(sim.argmax(dim=0)[q_idx], c_idx)
        assert torch.equal(sim.argmax(dim=1)[c_idx], q_idx)


def test_bad_shapes_and_precision_are_rejected():
    with pytest.raises(ValueError, match="expected query"):
        mnn_scores(torch.zeros(4, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="expected query"):
        mnn_scores(torch.zeros(2, 2, 8), torch.zeros(1, 2, 2, 4))


def test_int8_equals_the_definition_on_its_own_rounded_vectors():
    """int8 mode is exact arithmetic on the quantized maps: the definition applied to them agrees."""
    from model.matching.precision import index_bits
    from model.matching.quantize import quantize_int8

    query, cands = unit_maps(12, 12, 32, seed=21), unit_maps(4, 12, 12, 32, seed=22)
    bits = index_bits(144, 144)
    q8 = quantize_int8(query.reshape(1, 144, 32), bits)[0].numpy().astype(np.int64)
    c8 = quantize_int8(cands.reshape(4, 144, 32), bits).numpy().astype(np.int64)
    expected = [mnn_count_reference(q8, c) for c in c8]
    assert mnn_scores(query, cands, "int8", tile_elements=300).tolist() == expected


def test_negative_similarities_and_packed_keys():
    """Best matches with negative similarity: the packed keys must still order them correctly."""
    query = unit_maps(5, 5, 16, seed=23)
    cands = -torch.stack([query, unit_maps(5, 5, 16, seed=24)])
    for precision in ALL_PRECISIONS:
        assert mnn_scores(query, cands, precision).tolist() == mnn_scores(query, cands, EXACT).tolist()


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_reduced_precision_stays_close_on_random_maps(precision):
    query, cands = unit_maps(30, 30, 64, seed=25), unit_maps(6, 30, 30, 64, seed=26)
    cands[::2] = F.normalize(query + 0.5 * cands[::2], dim=-1)
    exact = mnn_scores(query, cands, EXACT)
    approx = mnn_scores(query, cands, precision)
    assert (approx - exact).abs().max() <= 0.05 * exact.max()
    assert rerank_order(approx)[0] == rerank_order(exact)[0]


def test_int8_results_do_not_depend_on_the_matmul_path(monkeypatch):
    """Integer similarities are exact, so torch._int_mm, the float32 GEMM route (oneDNN with the
    1.5 * 2^23 bias, or torch.addmm) and the float fallback of a device without int8 support give
    identical counts, whatever the tiling; also with dot products near the int8 limit."""
    query, cands = unit_maps(20, 20, 32, seed=27), unit_maps(5, 20, 20, 32, seed=28)
    cands[1] = F.normalize(query + 0.4 * cands[1], dim=-1)
    cands[2] = query  # dot products at their largest
    cands[3] = -query  # and most negative
    monkeypatch.setenv(kernels.INT8_ROUTE_ENV, "int")
    native = mnn_scores(query, cands, "int8").tolist()
    results = []
    for onednn in (True, False):
        monkeypatch.setattr(kernels, "_onednn_float32_works", lambda channels, onednn=onednn: onednn)
        monkeypatch.setenv(kernels.INT8_ROUTE_ENV, "float")
        results += [mnn_scores(query, cands, "int8", tile_elements=t).tolist() for t in (1000, 10**7)]
    monkeypatch.setenv(kernels.INT8_ROUTE_ENV, "int")
    monkeypatch.setitem(kernels._INT_MM_WORKS, "cpu", False)
    results += [mnn_scores(query, cands, "int8", tile_elements=t).tolist() for t in (1000, 50_000, 10**7)]
    assert results == [native] * 7
    assert native[2] == 400


def test_without_torchs_private_gemms_the_counts_stay(monkeypatch):
    """A torch release without torch._int_mm or oneDNN's inductor ops costs speed, not correctness:
    every precision then runs on public GEMMs with the same counts."""
    query, cands = unit_maps(20, 20, 64, seed=31), unit_maps(4, 20, 20, 64, seed=32)
    cands[1] = F.normalize(query + 0.3 * cands[1], dim=-1)
    monkeypatch.setenv(NATIVE_ENV, "0")  # the C kernels use neither; the torch tiles are the point
    monkeypatch.delenv(kernels.INT8_ROUTE_ENV, raising=False)
    expected = {p: mnn_scores(query, cands, p).tolist() for p in ALL_PRECISIONS}

    def gone(*args, **kwargs):
        raise AttributeError("not in this torch")

    monkeypatch.delattr(torch, "_int_mm")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", gone, raising=False)
    monkeypatch.setitem(kernels._INT_MM_WORKS, "cpu", True)
    kernels._onednn_float32_works.cache_clear()  # measured once per process: again without the ops
    kernels._cpu_gemm_times.cache_clear()
    try:
        assert not kernels._onednn_float32_works(64)
        assert kernels.int8_route(torch.device("cpu")) == "float"
        assert {p: mnn_scores(query, cands, p).tolist() for p in ALL_PRECISIONS} == expected
        monkeypatch.setenv(kernels.INT8_ROUTE_ENV, "int")  # forced onto torch._int_mm: its fallback
        assert mnn_scores(query, cands, "int8").tolist() == expected["int8"]
    finally:
        monkeypatch.undo()
        kernels._onednn_float32_works.cache_clear()
        kernels._cpu_gemm_times.cache_clear()


def test_rerank_order_breaks_ties_by_global_rank():
    scores = [5, 9, 5, 9, 1]
    assert rerank_order(scores).tolist() == [1, 3, 0, 2, 4]
    assert rerank_order(scores, reference_compatible=True).tolist() == [3, 1, 2, 0, 4]
    assert rerank_order(np.array([], dtype=np.int64)).tolist() == []


def test_default_precision_and_compute_device(monkeypatch):
    """Without the C kernels the default is int8+float32 on CPUs whose int8 products run at least twice
    as fast as float32 ones, else exact float32."""
    query, cands = unit_maps(5, 5, 8, seed=19), unit_maps(8, 5, 5, 8, seed=20)
    assert mnn_scores(query, cands).device.type == "cpu"
    monkeypatch.setattr(defaults.native, "native_enabled", lambda device, precision, channels=128: False)
    for speedup, expected in ((3.5, "int8+float32"), (1.6, "float32")):
        monkeypatch.setattr(kernels, "int8_gemm_speedup", lambda device, s=speedup: s)
        assert default_precision(torch.device("cpu")) == expected
        assert mnn_scores(query, cands).tolist() == mnn_scores(query, cands, expected).tolist()
        assert default_precision(torch.device("cuda")) == "float32"  # GPUs: float32 whatever int8 does
    with pytest.raises(ValueError, match="unknown precision"):
        mnn_scores(query, cands, device="cpu", precision="int4")


def test_default_precision_with_the_c_kernels_follows_the_map_size(monkeypatch):
    """int8's fixed costs make it no faster on small maps; the rule is the same in every process."""
    monkeypatch.setattr(defaults.native, "native_enabled", lambda device, precision, channels=128: True)
    by_name = {kernel.name: kernel for kernel in defaults.native.KERNELS}
    real_kernel_for = defaults.native.kernel_for

    def amx_for_int8(precision):  # the other precisions keep this CPU's kernels: the matching runs them
        return by_name["int8 on AMX"] if precision is Precision.INT8 else real_kernel_for(precision)

    monkeypatch.setattr(defaults.native, "kernel_for", amx_for_int8)
    cpu = torch.device("cpu")
    assert default_precision(cpu, (61, 61, 128)) == "int8+float32"  # the local head's maps
    assert default_precision(cpu, (32, 32, 768)) == "int8+float32"
    assert default_precision(cpu) == "int8+float32"  # no shape: the local head's
    assert default_precision(cpu, [16, 16, 384]) == "float32"  # ViT patch tokens at 224 px
    assert default_precision(cpu, (16, 16, 1024)) == "float32"
    query, cands = unit_maps(16, 16, 32, seed=21), unit_maps(4, 16, 16, 32, seed=22)
    assert mnn_scores_detailed(query, cands).precision == "float32"
    for name in ("int8 on AVX-512 VNNI", "int8 on AVX-VNNI"):
        monkeypatch.setattr(defaults.native, "kernel_for", lambda precision, n=name: by_name[n])
        assert default_precision(cpu, (61, 61, 128)) == "int8+float32"
    for name in (
        "int8 on AVX2",
        "int8 on dot product",
        "int8 on i8mm",
    ):  # no faster than float32 / unmeasured
        monkeypatch.setattr(defaults.native, "kernel_for", lambda precision, n=name: by_name[n])
        assert default_precision(cpu, (61, 61, 128)) == "float32"


def test_the_default_follows_the_kernels_the_instruction_set_allows(monkeypatch):
    """Capped at AVX2 (an AMD EPYC's instruction set) the default is exact float32, on its kernel."""
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    if native.kernel_for(Precision.INT8) is None or not native.native_available(Precision.FLOAT32, 128):
        pytest.skip("no AVX2 kernels here (this CPU, or SELAVPR_NATIVE_MNN=0)")
    assert default_precision(torch.device("cpu"), (61, 61, 128)) == "float32"


def test_refine_candidates_keeps_every_possible_winner():
    counts = torch.tensor([3000, 2000, 2900, 3100, 50])
    assert refine_candidates(counts).tolist() == [0, 2, 3]  # 2000 + 4 sqrt(2001) < 3100 - 4 sqrt(3101)
    assert refine_candidates(counts, exact_top=3).tolist() == [0, 2, 3]
    assert refine_candidates(counts, exact_top=4).tolist() == [0, 1, 2, 3]
    assert refine_candidates(torch.zeros(0, dtype=torch.int64)).tolist() == []


def _recorder(exact: torch.Tensor):
    calls: list[list[int]] = []

    def recount(picked: list[int]) -> torch.Tensor:
        calls.append(picked)
        return exact[picked]

    return recount, calls


def test_refine_recounts_a_standing_out_candidate_and_drops_the_rest():
    """One clear winner: recounted first; its exact count lifts the floor above the others' bounds."""
    int8 = torch.tensor([1850, 1900, 3000, 2980, 1870] + [1860] * 15)
    exact = int8 + torch.tensor([5, -3, 40, -30, 2] + [0] * 15)  # the winner gains on its rival
    recount, calls = _recorder(exact)
    refined = refine(int8, recount, RecountPolicy(max_recount_fraction=0.25))
    assert refined.top_exact and calls[0][:2] == [2, 3]
    assert sorted(refined.recounted.tolist()) == [2, 3]
    assert refined.counts[2] == 3040 and refined.counts[0] == 1850


def test_refine_stops_at_its_budget_when_nothing_stands_out():
    """Twenty near-equal counts: the budget (a quarter of K) caps the float32 work, and the result
    says that the top is not guaranteed."""
    int8 = torch.tensor([1850 + i % 7 for i in range(20)])
    recount, calls = _recorder(int8 + 1)
    refined = refine(int8, recount, RecountPolicy(max_recount_fraction=0.25))
    assert not refined.top_exact
    assert sum(map(len, calls)) == len(refined.recounted) == 5
    assert refine(int8, recount, RecountPolicy(max_recount_fraction=1.0)).top_exact


def test_refined_default_recounts_the_top_exactly():
    query, cands = unit_maps(25, 25, 32, seed=31), unit_maps(12, 25, 25, 32, seed=32)
    for i in (2, 5, 7):
        cands[i] = F.normalize(query + (0.6 + 0.05 * i) * cands[i], dim=-1)
    exact = mnn_scores(query, cands, EXACT)
    int8 = mnn_scores(query, cands, "int8")
    scored = mnn_scores_detailed(query, cands, "int8+float32")
    refined = scored.counts
    recounted = refined == exact
    assert scored.top_exact and 1 <= scored.recounted <= 3
    assert recounted[exact.argmax()]
    assert torch.equal(refined[~recounted], int8[~recounted])
    assert rerank_order(refined)[0] == rerank_order(exact)[0]
    assert not recounted.all()  # the unrelated candidates were left at their int8 counts
    assert mnn_scores_detailed(query, cands[:3], "int8+float32").counts.tolist() == exact[:3].tolist()


def test_float_near_ties_within_a_key_bucket_keep_the_first_maximum(monkeypatch):
    """Values one float32 step apart fall in one bucket of the packed key, a lower index holding the
    smaller one: the reducer's exact check must catch that on rows and on columns and fall back to
    argmax, and a row whose similarities are all negative must come out right too."""
    from model.matching import reducers

    monkeypatch.setenv(NATIVE_ENV, "0")  # the tiles' reducer (test_native.py: the same maps there)
    caught = {"rows": 0, "columns": 0}

    def spy(name, real, dim):
        def check(sim, arg, best):
            picked = torch.gather(sim, dim, arg.unsqueeze(dim)).squeeze(dim)
            caught[name] += int((picked != best).sum())
            real(sim, arg, best)

        return check

    monkeypatch.setattr(reducers, "_fix_rows", spy("rows", reducers._fix_rows, 2))
    monkeypatch.setattr(reducers, "_fix_columns", spy("columns", reducers._fix_columns, 1))
    step = 2.0**-24  # one float32 step above 0.5
    near = torch.tensor([0.5 + step, 0.5 + 2 * step, 0.25]).reshape(1, 3, 1)
    ones = torch.tensor([1.0, -1.0]).reshape(1, 2, 1)
    for query, cands in ((ones, near[None]), (near, ones[None])):
        for tile in (2, 6, 10_000):
            assert mnn_scores(query, cands, EXACT, tile_elements=tile).tolist() == full_tensor_counts(
                query, cands
            )
            q_idx, c_idx = mnn_pairs(query, cands[0], EXACT, tile_elements=tile)
            sim = cands[0].reshape(-1, 1) @ query.reshape(-1, 1).T
            assert torch.equal(sim.argmax(dim=0)[q_idx], c_idx)
            assert torch.equal(sim.argmax(dim=1)[c_idx], q_idx)
    assert caught["rows"] > 0 and caught["columns"] > 0


def test_cuda_int8_padding_keeps_the_products():
    """The GPU path pads operands for cuBLASLt; the products it keeps must not change (checked here
    with the CPU kernel, which takes the padded shapes too)."""
    gen = torch.Generator().manual_seed(33)
    a = torch.randint(-127, 128, (5, 13), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (13, 21), dtype=torch.int8, generator=gen)
    pa, pb = kernels.pad_for_cublas_int8(a, b)
    assert pa.shape == (17, 16) and pb.shape == (16, 24)
    expected = a.int() @ b.int()
    assert torch.equal(torch._int_mm(pa, pb)[:5, :21], expected)
    assert torch.equal(kernels.int8_matmul(a, b), expected)


def test_float32_results_do_not_depend_on_the_gemm(monkeypatch):
    """float32 uses oneDNN's packed GEMM on CPU when it is present and bit-identical to torch.mm;
    the plain torch.matmul path (what other devices run) must count the same."""
    query, cands = unit_maps(30, 30, 64, seed=34), unit_maps(4, 30, 30, 64, seed=35)
    cands[2] = F.normalize(query + 0.7 * cands[2], dim=-1)
    onednn = mnn_scores(query, cands, EXACT)
    monkeypatch.setattr(kernels, "_onednn_float32_works", lambda channels: False)
    plain = mnn_scores(query, cands, EXACT)
    assert onednn.tolist() == plain.tolist() == full_tensor_counts(query, cands)
