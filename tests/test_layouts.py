"""Block layouts, SPION generators, fixed layouts, switch criterion, plots."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparsecc.errors import LayoutError
from sparsecc.layouts import BlockLayout, LayoutSet, save_layout_png
from sparsecc.methods.fixed.layouts import bigbird, layout_at_density, local_window, random_layout, strided
from sparsecc.methods.spion.layouts import (
    SwitchCriterion,
    block_pool,
    diagonal_conv,
    flood_fill,
    quantile_threshold,
    spion_c,
    spion_cf,
    spion_f,
    spion_layouts,
)


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def B(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def blocks_to_map(S: torch.Tensor, b: int) -> torch.Tensor:
    """An attention-like map that is constant on b x b tiles, so block_pool gives S back exactly."""
    return S.repeat_interleave(b, 0).repeat_interleave(b, 1)


def reference_flood_fill(S: torch.Tensor, t: float) -> torch.Tensor:
    """Straight transcription of the released walks, without the visited-cell shortcut."""
    n, m = S.shape
    P = torch.zeros(n + 1, m + 1, dtype=torch.float64)
    P[:n, :m] = S
    out = torch.zeros(n, m, dtype=torch.bool)
    for x0, y0 in [(0, k) for k in range(m)] + [(k, 0) for k in range(n)]:
        x, y = x0, y0
        while x + 1 < n + 1 and y + 1 < m + 1:
            down, right, diag = P[x + 1, y], P[x, y + 1], P[x + 1, y + 1]
            if down > right:
                x, y = (x + 1, y) if down > diag else (x + 1, y + 1)
            else:
                x, y = (x, y + 1) if right > diag else (x + 1, y + 1)
            if x < n and y < m and P[x, y] > t:
                out[x, y] = True
    return out


# --------------------------------------------------------------------------- flood fill
def test_flood_fill_hand_worked_3x3():
    # Padded P (t = 2.5):      Walks (cell stepped to, * = marked):
    #   5 1 0 | 0               (0,0): d=2 r=1 g=4 -> d>r, d<=g -> diag (1,1)*4; (1,1): d=6 r=3 g=1 -> down (2,1)*6;
    #   2 4 3 | 0                      (2,1): d=0 r=1 g=0 -> right (2,2) 1; (2,2): all 0 -> diag, padding, end.
    #   0 6 1 | 0               (0,1): d=4 r=0 g=3 -> down (1,1)*, then as above.
    #   0 0 0   0               (0,2): d=3 r=0 g=0 -> down (1,2)*3; (1,2): d=1 r=0 g=0 -> down (2,2); end.
    #                           (1,0): d=0 r=4 g=6 -> r<=g -> diag (2,1)*;  (2,0): d=0 r=6 g=0 -> right (2,1)*.
    # (0,0) scores 5 > t but is only ever a start cell: not marked.
    S = T([[5, 1, 0], [2, 4, 3], [0, 6, 1]])
    assert torch.equal(flood_fill(S, 2.5), B([[0, 0, 0], [0, 1, 1], [0, 1, 0]]))


def test_flood_fill_tie_down_equals_diag_goes_diagonal():
    # P = [[0 0 0] [2 2 0] [0 0 0]], t = 1.
    # (0,0): down=2 right=0 diag=2 -> down > right but not down > diag -> diagonal (1,1)*.
    # (0,1): down=2 right=0 diag=0 -> down (1,1)*.  (1,0): down=0 right=2 diag=0 -> right (1,1)*.
    # (1,0) scores 2 > t but no walk steps onto it (a down-preferring tie rule would mark it).
    assert torch.equal(flood_fill(T([[0, 0], [2, 2]]), 1.0), B([[0, 0], [0, 1]]))


def test_flood_fill_tie_down_equals_right_goes_right():
    # P = [[0 2 0] [2 0 0] [0 0 0]], t = 1.
    # (0,0): down=2 right=2 diag=0 -> not down > right -> right > diag -> right (0,1)*.
    # (0,1): all neighbours 0 -> diagonal onto padding.  (1,0): all 0 -> diagonal onto padding.
    # (1,0) scores 2 > t but is only a start cell.
    assert torch.equal(flood_fill(T([[0, 2], [2, 0]]), 1.0), B([[0, 1], [0, 0]]))


def test_flood_fill_three_way_tie_goes_diagonal():
    # P = [[1 1 0] [1 1 0] [0 0 0]]: (0,0) sees down=right=diag=1 -> diagonal (1,1).
    # (0,1): down=1 right=0 diag=0 -> down (1,1).  (1,0): right (1,1).  Only (1,1) is reached.
    S = T([[1, 1], [1, 1]])
    assert torch.equal(flood_fill(S, 0.5), B([[0, 0], [0, 1]]))


def test_flood_fill_needs_score_strictly_above_threshold():
    S = T([[0, 1], [1, 1]])  # every walk reaches (1,1), score 1
    assert torch.equal(flood_fill(S, 0.999), B([[0, 0], [0, 1]]))
    assert not flood_fill(S, 1.0).any()


def test_flood_fill_matches_reference_on_random_maps_with_ties():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n, m = (6, 6) if trial % 4 else (5, 8)
        S = torch.randint(0, 4, (n, m), generator=gen).double()  # small integers: many ties
        t = float(torch.randint(0, 3, (1,), generator=gen)) + 0.5 * (trial % 2)
        assert torch.equal(flood_fill(S, t), reference_flood_fill(S, t)), (S, t)


def test_flood_fill_at_l8192_scale_matches_reference():
    """128 x 128 blocks (L = 8192, b = 64): the fast walk equals the plain transcription."""
    S = torch.rand(128, 128, generator=torch.Generator().manual_seed(1)).double()
    t = quantile_threshold(S, 0.98)
    out = flood_fill(S, t)
    assert torch.equal(out, reference_flood_fill(S, t))
    assert 0 < int(out.sum()) < 128 * 128 * 0.05  # only cells above the 98th percentile can be marked


# ------------------------------------------------------------------------ conv / pool
@pytest.mark.parametrize("k", [1, 3, 4, 5])
def test_diagonal_conv_matches_conv2d_and_formula(k):
    gen = torch.Generator().manual_seed(k)
    A = torch.randint(0, 10, (7, 9), generator=gen).float()  # integers: sums are exact in any order
    with warnings.catch_warnings():  # even k: PyTorch warns about a padded copy
        warnings.simplefilter("ignore")
        ref = F.conv2d(A[None, None], torch.eye(k)[None, None], padding="same")[0, 0]
    out = diagonal_conv(A, k)
    assert torch.equal(out, ref)
    p = (k - 1) // 2
    i, j = 3, 5
    direct = sum(float(A[i + s - p, j + s - p]) for s in range(k)
                 if 0 <= i + s - p < 7 and 0 <= j + s - p < 9)
    assert float(out[i, j]) == direct


def test_diagonal_conv_identity_kernel_31_on_small_map():
    A = torch.arange(36, dtype=torch.float32).reshape(6, 6)
    # Kernel 31 is wider than the map: every output sums its whole diagonal.
    out = diagonal_conv(A, 31)
    assert float(out[0, 0]) == float(A.diagonal().sum())
    assert float(out[2, 3]) == float(A.diagonal(1).sum())


def test_block_pool():
    A = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    assert torch.equal(block_pool(A, 2), F.avg_pool2d(A[None, None], 2)[0, 0])
    A = torch.arange(35, dtype=torch.float32).reshape(5, 7)
    S = block_pool(A, 2)
    assert S.shape == (3, 4)
    assert float(S[2, 3]) == float(A[4, 6])  # 1x1 tail tile
    assert float(S[0, 3]) == float(A[0:2, 6].mean())  # 2x1 tail tile
    assert float(S[1, 1]) == float(A[2:4, 2:4].mean())


@pytest.mark.parametrize("q", [0.0, 0.5, 0.7, 0.96, 0.98, 0.99, 1.0])
def test_quantile_threshold_equals_torch_quantile(q):
    S = torch.rand(37, 29, generator=torch.Generator().manual_seed(3))
    assert quantile_threshold(S, q) == float(torch.quantile(S, q))


# ------------------------------------------------------------------------------ SPION
# Block score map for the end-to-end tests (block_size 2, A constant on tiles):
#   9 1 0 0     sorted: six 0s, 1 1 2 3 4 5 6 7 8 9
#   1 8 2 0     q=0.75: rank 11.25 -> t = 5 + 0.25 = 5.25
#   0 7 3 5     q=0.70: rank 10.5  -> t = 4.5
#   0 0 6 4
# Walks: (0,0) -> diag (1,1)*8 -> down (2,1)*7 -> [d=0 r=3 g=6] diag (3,2)*6 -> right (3,3) 4 -> pad.
#        (0,2) -> down (1,2) 2 -> [d=3 r=0 g=5] diag (2,3) 5 -> down (3,3) -> pad.
#        the others reach only cells above, or the padding.
# q=0.75: marked (1,1) (2,1) (3,2); (2,3)=5 is not > 5.25. q=0.70: (2,3) is marked as well.
SPION_S = T([[9, 1, 0, 0], [1, 8, 2, 0], [0, 7, 3, 5], [0, 0, 6, 4]])
SPION_MASK_075 = B([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])


def test_spion_f_end_to_end_hand_worked():
    A = blocks_to_map(SPION_S, 2)
    lay = spion_f(A, block_size=2, quantile=0.75)
    assert lay.meta["threshold"] == pytest.approx(5.25)
    assert torch.equal(lay.mask, SPION_MASK_075)
    lay70 = spion_f(A, block_size=2, quantile=0.70)
    expected = SPION_MASK_075.clone()
    expected[2, 3] = True
    assert torch.equal(lay70.mask, expected)
    # Causal rule: the only tile above the diagonal, (2,3), is dropped.
    causal = spion_f(A, block_size=2, quantile=0.70, causal=True)
    assert causal.causal and torch.equal(causal.mask, SPION_MASK_075)


def test_spion_cf_with_kernel_1_equals_spion_f_and_default_runs():
    A = blocks_to_map(SPION_S, 2)
    assert torch.equal(spion_cf(A, 2, 0.75, kernel_size=1).mask, SPION_MASK_075)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 256, 16, generator=gen)
    probs = torch.softmax(x @ x.transpose(-1, -2), dim=-1)  # [batch, heads, L, L]: averaged inside
    lay = spion_cf(probs, block_size=32)
    assert lay.shape == (8, 8) and lay.mask.diagonal().all()
    assert lay.meta["quantile"] == 0.98 and lay.meta["kernel_size"] == 31
    causal = spion_cf(torch.tril(probs), block_size=32, causal=True)
    assert not torch.triu(causal.mask, 1).any()


def test_spion_c_exact_block_counts():
    A = blocks_to_map(SPION_S, 2)
    # density 0.5 on 4x4 -> k = int(0.5 * 16 - 4) = 4: top scores 9 (diag), 8 (diag), 7, 6 -> plus
    # the diagonal: 4 + 4 - 2 = 6 tiles as released.
    lay = spion_c(A, block_size=2, density=0.5, kernel_size=1)
    assert lay.meta["k"] == 4 and lay.num_blocks == 6
    assert torch.equal(lay.mask, B([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]))
    # exclude_diagonal: the 4 best off-diagonal tiles (7, 6, 5, 2) plus the diagonal = exactly 8.
    ex = spion_c(A, block_size=2, density=0.5, kernel_size=1, exclude_diagonal=True)
    assert ex.num_blocks == 8 and ex.density == 0.5
    assert ex.mask[2, 3] and ex.mask[1, 2] and not ex.mask[0, 1]
    # Causal: picks only below the diagonal: 7 (2,1), 6 (3,2), 1 (1,0), then the first 0 in
    # row-major order, (2,0) (stable tie-break).
    ca = spion_c(A, block_size=2, density=0.5, kernel_size=1, exclude_diagonal=True, causal=True)
    assert torch.equal(ca.mask, B([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]]))


def test_spion_bad_inputs():
    A = torch.rand(64, 64)
    with pytest.raises(LayoutError, match="quantile"):
        spion_cf(A, 16, quantile=98)
    with pytest.raises(LayoutError, match="density"):
        spion_c(A, 16, density=0.0)
    with pytest.raises(LayoutError, match="NaN"):
        spion_f(torch.full((8, 8), float("nan")), 4)


def test_spion_layouts_builds_a_set():
    maps = {f"layer.{i}": torch.softmax(torch.randn(64, 64), -1) for i in range(3)}
    s = spion_layouts(maps, "spion_f", block_size=16, quantile=0.9)
    assert list(s) == list(maps) and all(s[k].name == k for k in s)


# ------------------------------------------------------------------------ BlockLayout
def test_block_layout_basics_and_validation():
    lay = BlockLayout(torch.tensor([[1, 0], [1, 1]]), block_size=4, causal=True)
    assert lay.mask.dtype == torch.bool and lay.num_blocks == 3 and lay.density == 0.75
    assert BlockLayout.full(8, 4, causal=True) == lay
    with pytest.raises(LayoutError, match="above the block diagonal"):
        BlockLayout(B([[1, 1], [0, 1]]), 4, causal=True)
    with pytest.raises(LayoutError, match="2-D"):
        BlockLayout(torch.ones(2, 2, 2, dtype=torch.bool), 4)
    with pytest.raises(LayoutError, match="0 and 1"):
        BlockLayout(torch.tensor([[2, 0], [0, 1]]), 4)
    with pytest.raises(LayoutError, match="block_size"):
        BlockLayout(B([[1]]), 0)


def test_dense_mask_and_length_check():
    lay = BlockLayout(B([[1, 0], [1, 1]]), 3, causal=True)
    dm = lay.dense_mask(5, 5)  # 2 blocks of 3 cover 4..6 tokens
    assert torch.equal(dm, torch.ones(5, 5, dtype=torch.bool).tril())
    lay2 = BlockLayout(B([[1, 0], [0, 1]]), 3)
    expected = torch.zeros(5, 6, dtype=torch.bool)
    expected[:3, :3] = True
    expected[3:, 3:] = True
    assert torch.equal(lay2.dense_mask(5, 6), expected)
    with pytest.raises(LayoutError, match="fit"):
        lay2.dense_mask(7, 6)


def test_ell_csr_round_trip():
    mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    mask[3] = False  # an empty row
    lay = BlockLayout(mask, 16)
    idx, counts = lay.ell()
    rebuilt = torch.zeros_like(mask)
    for i in range(6):
        rebuilt[i, idx[i, : counts[i]]] = True
    assert torch.equal(rebuilt, mask)
    crow, col = lay.csr()
    rebuilt = torch.zeros_like(mask)
    for i in range(6):
        rebuilt[i, col[crow[i] : crow[i + 1]]] = True
    assert torch.equal(rebuilt, mask)
    assert lay.empty_rows() == [3]


def test_fit_crop_extend_rules_and_error():
    lay = BlockLayout(B([[1, 1], [0, 1]]), 32, name="L0")
    assert lay.fit(64) is lay
    assert torch.equal(lay.fit(33).mask, B([[1, 1], [0, 1]]))  # ceil(33/32) = 2 blocks
    assert torch.equal(lay.fit(20).mask, B([[1]]))
    with pytest.raises(LayoutError, match=r"kv_len <= 64.*q_len=100"):
        lay.fit(100)
    diag = lay.fit(128, extend="diagonal").mask
    assert torch.equal(diag, B([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    # repeat_band: calibrated offsets j - i in {0, +1}; calibrated corner kept as is.
    band = lay.fit(128, extend="repeat_band").mask
    assert torch.equal(band, B([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]]))
    # Mixed: more query blocks, fewer key blocks.
    mixed = lay.fit(96, 32, extend="repeat_band").mask
    assert torch.equal(mixed, B([[1], [0], [0]]))
    causal = BlockLayout(B([[1, 0], [1, 1]]), 32, causal=True).fit(96, extend="repeat_band")
    assert torch.equal(causal.mask, B([[1, 0, 0], [1, 1, 0], [0, 1, 1]]))
    with pytest.raises(LayoutError, match="extend"):
        lay.fit(128, extend="stretch")


def test_fit_structure_rule_by_hand():
    # bands: d=0 (4/4), d=+1 (3/3), d=+2 (1/2), d=+3 (1/1), d=-2 (1/2), d=-3 (1/1) continue; d=-1 (1/3) does not.
    # column 0 (4/4) and row 0 (4/4) are global; row 1 (3/4) and column 3 (3/4) are not.
    lay = BlockLayout(B([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1], [1, 0, 0, 1]]), 8)
    grown = lay.fit(48, extend="structure")
    assert torch.equal(grown.mask, B([[1, 1, 1, 1, 1, 1],
                                      [1, 1, 1, 0, 1, 0],  # (1, 5): offset +4 was never calibrated
                                      [1, 0, 1, 1, 1, 1],
                                      [1, 0, 0, 1, 1, 1],
                                      [1, 1, 1, 0, 1, 1],
                                      [1, 0, 1, 1, 0, 1]]))
    assert grown.meta["extend"] == "structure" and grown.meta["fitted_from"] == [4, 4]
    assert torch.equal(grown.fit(32).mask, lay.mask)  # the calibrated corner is kept as it was
    # causal: shares count only the tiles a query may see (j <= i); nothing above the diagonal
    causal = BlockLayout(B([[1, 0, 0], [1, 1, 0], [1, 0, 1]]), 8, causal=True).fit(40, extend="structure")
    assert torch.equal(causal.mask, B([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                       [1, 1, 1, 1, 0], [1, 0, 1, 1, 1]]))


def test_save_load_round_trip(tmp_path):
    lay = BlockLayout(B([[1, 0, 0], [1, 1, 0], [0, 1, 1]]), 16, True, "enc.0", {"method": "x", "t": 0.5})
    path = tmp_path / "sub" / "layout.pt"
    lay.save(path)
    back = BlockLayout.load(path)
    assert back == lay and back.name == "enc.0" and back.meta == {"method": "x", "t": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["layout.pt"]  # no temporary left behind
    with pytest.raises(LayoutError, match="JSON"):
        BlockLayout(B([[1]]), 4, meta={"t": torch.ones(1)}).save(tmp_path / "bad.pt")
    with pytest.raises(LayoutError, match="no layout file"):
        BlockLayout.load(tmp_path / "missing.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(LayoutError, match="not a saved BlockLayout"):
        BlockLayout.load(tmp_path / "other.pt")


def test_layout_set(tmp_path):
    s = LayoutSet()
    s["enc.1"] = local_window(128, 32, 3)
    s["enc.0"] = BlockLayout.full(128, 32)
    assert list(s) == ["enc.1", "enc.0"] and s["enc.0"].name == "enc.0"
    assert s.densities() == {"enc.1": 10 / 16, "enc.0": 1.0}
    table = s.summary()
    assert "enc.1" in table and "0.6250" in table and "1.0000" in table
    s.save_dir(tmp_path / "layouts")
    index = json.loads((tmp_path / "layouts" / "index.json").read_text())
    assert [e["name"] for e in index["layers"]] == ["enc.1", "enc.0"]
    back = LayoutSet.load_dir(tmp_path / "layouts")
    assert list(back) == list(s) and all(back[k] == s[k] for k in s)
    with pytest.raises(LayoutError, match="index.json"):
        LayoutSet.load_dir(tmp_path)
    with pytest.raises(LayoutError):
        s["x"] = torch.ones(2, 2)


# ------------------------------------------------------------------------------ flex
@pytest.mark.parametrize("causal", [False, True])
def test_flex_block_mask(causal):
    from torch.nn.attention.flex_attention import flex_attention

    lay = random_layout(80, 16, 0.45, seed=2, causal=causal)
    bm = lay.to_flex_block_mask(batch=2, heads=3, q_len=75, kv_len=75)
    dense = bm.to_dense()
    assert dense.shape == (2, 3, 5, 5)
    assert torch.equal(dense[1, 2].bool(), lay.mask)
    if causal:  # diagonal tiles are partial (need the mask_mod), the rest full
        assert torch.equal(bm.kv_num_blocks[0, 0], lay.mask.diagonal().int())
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 75, 8, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=bm)  # eager: applies only the mask_mod
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=lay.dense_mask(75, 75))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ fixed layouts
def test_local_window_density():
    assert local_window(256, 32, 3).num_blocks == 8 + 2 * 7
    assert local_window(256, 32, 3, causal=True).num_blocks == 8 + 7 + 6
    assert local_window(250, 32, 1).density == 1 / 8
    m = local_window(128, 32, 2).mask  # even window: one more block on the past side
    assert m[2, 1] and m[2, 2] and not m[2, 3]


def test_bigbird_density():
    # n = 8, window 3, global 2: rows 0-1 full (16); rows 2..7 see cols 0,1 plus their band:
    # 4 + 5 + 5 + 5 + 5 + 4 = 28 -> 44 tiles. Random 3 per row fits in every non-global row: +18.
    assert bigbird(256, 32, 3, 2, 0).num_blocks == 44
    lay = bigbird(256, 32, 3, 2, 3, seed=5)
    assert lay.num_blocks == 62 and lay.density == 62 / 64
    assert lay == bigbird(256, 32, 3, 2, 3, seed=5)
    causal = bigbird(256, 32, 3, 2, 2, seed=5, causal=True)
    assert not torch.triu(causal.mask, 1).any() and causal.mask[:, 0].all()


def test_strided_and_random():
    assert strided(256, 32, stride=4).num_blocks == 8 + 4 + 4
    lay = random_layout(512, 32, 0.25, seed=1)
    assert lay.num_blocks == 64 and lay.mask.diagonal().all()
    ca = random_layout(512, 32, 0.25, seed=1, causal=True)
    assert ca.num_blocks == 64 and not torch.triu(ca.mask, 1).any()
    with pytest.raises(LayoutError, match="outside"):
        random_layout(512, 32, 0.01)
    with pytest.raises(LayoutError, match="outside"):
        random_layout(512, 32, 0.9, causal=True)


@pytest.mark.parametrize("kind", ["local", "strided", "bigbird", "random"])
@pytest.mark.parametrize("causal", [False, True])
def test_layout_at_density(kind, causal):
    lay = layout_at_density(kind, 2048, 32, 0.15, causal=causal)  # 64 x 64 blocks
    assert lay.causal == causal and lay.meta["density_target"] == 0.15
    tol = {"local": 1 / 64, "strided": 0.03, "bigbird": 1 / 64, "random": 1 / 4096}[kind]
    assert abs(lay.density - 0.15) <= tol
    with pytest.raises(LayoutError):
        layout_at_density("banded", 2048, 32, 0.15)


# ------------------------------------------------------------------- switch criterion
def test_switch_criterion_sequence():
    E = torch.full((2, 2), 0.5, dtype=torch.float64)  # ||E||_F = 1
    a = [0.0, 1.0, 2.1, 3.2, 4.3]  # steps 1.0, 1.1, 1.1, 1.1: deltas 10 %, 0 %, 0 %
    b = [0.0, 1.0, 2.2, 3.45, 4.7]  # steps 1.0, 1.2, 1.25, 1.25: deltas 20 %, 4.2 %, 0 %
    sc = SwitchCriterion(15.0, rule="consecutive")  # the released rule: tests/test_released.py
    results = [sc.update({"a": a[t] * E, "b": b[t] * E}) for t in range(3)]
    assert results == [False, False, False]
    assert sc.deltas["a"] == pytest.approx(10.0) and sc.deltas["b"] == pytest.approx(20.0)
    assert sc.update({"a": a[3] * E, "b": b[3] * E}) is True
    assert sc.deltas["b"] == pytest.approx(100 * 0.05 / 1.2)
    assert sc.update({"a": a[4] * E, "b": b[4] * E}) is True and sc.switched
    with pytest.raises(LayoutError, match="layer names changed"):
        sc.update({"a": E})


# ------------------------------------------------------------------------------ plot
def test_save_layout_png(tmp_path):
    s = LayoutSet({"enc.0": local_window(256, 32, 3), "enc.1": bigbird(256, 32, causal=True),
                   "enc.2": spion_f(blocks_to_map(SPION_S, 2), 2, 0.75)})
    path = tmp_path / "layouts.png"
    save_layout_png(s, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["layouts.png"]


def test_layout_at_density_bigbird_warns_when_its_structure_does_not_fit():
    # 16 x 16 blocks: window 3 + one global block already keeps 74 of 256 tiles (0.29), so at
    # density 0.083 only the block diagonal is left (the ListOps L=512, block 32 case).
    with pytest.warns(UserWarning, match="no longer BigBird"):
        lay = layout_at_density("bigbird", 512, 32, 0.083)
    assert (lay.meta["window"], lay.meta["global_blocks"]) == (1, 0)
    assert lay.mask.equal(torch.eye(16, dtype=torch.bool))
    # At block 8 (64 x 64 blocks) the same density keeps window 3 and a global block, silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lay = layout_at_density("bigbird", 512, 8, 0.083)
    assert lay.meta["window"] == 3 and lay.meta["global_blocks"] >= 1
    assert abs(lay.density - 0.083) <= 0.5 / 64
