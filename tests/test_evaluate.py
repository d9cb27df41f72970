"""evaluate.py: ADM's metrics against independent float64 / numpy formulas, the Inception port with
random weights made here, the sFID layer and its (H, W, C) order, file checks and the CLI."""
from __future__ import annotations

import json
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg, special

import evaluate
from evaluate import Activations

# ---------------------------------------------------------------- independent references


def np_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """TF's graph for ADM's distances, in numpy: every op rounded to u's dtype, sums exact."""
    dtype = u.dtype.type
    with np.errstate(over="ignore", invalid="ignore"):  # float16 overflow is part of what is checked
        return _np_distances(u, v, dtype)


def _np_distances(u: np.ndarray, v: np.ndarray, dtype: type) -> np.ndarray:
    norm_u = (u * u).astype(np.float64).sum(1).astype(dtype)
    norm_v = (v * v).astype(np.float64).sum(1).astype(dtype)
    dots = (u.astype(np.float64) @ v.astype(np.float64).T).astype(dtype)
    return np.maximum((norm_u[:, None] - dtype(2) * dots) + norm_v[None, :], dtype(0)).astype(np.float32)


def np_block_distances(u: np.ndarray, v: np.ndarray, block: int) -> np.ndarray:
    """Float16 per block, float32 for the blocks where float16 overflows."""
    out = np.empty((len(u), len(v)), np.float32)
    for i in range(0, len(u), block):
        for j in range(0, len(v), block):
            d16 = np_distances(u[i : i + block].astype(np.float16), v[j : j + block].astype(np.float16))
            ok = np.isfinite(d16).all()
            out[i : i + block, j : j + block] = d16 if ok else np_distances(u[i : i + block], v[j : j + block])
    return out


def brute_force_pr(ref: np.ndarray, sample: np.ndarray, block: int, k: int = 3) -> tuple[float, float]:
    """Precision and recall from whole distance matrices and sorted rows."""
    ref_radii = np.sort(np_block_distances(ref, ref, block), axis=1)[:, k]
    sample_radii = np.sort(np_block_distances(sample, sample, block), axis=1)[:, k]
    cross = np_block_distances(ref, sample, block)
    precision = np.mean([np.any(cross[:, s] <= ref_radii) for s in range(len(sample))])
    recall = np.mean([np.any(cross[r, :] <= sample_radii) for r in range(len(ref))])
    return precision, recall


def features(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    return np.maximum(0, rng.standard_normal((n, dim)) + shift).astype(np.float32)


def assert_one_sentence(message: str, *needles: str) -> None:
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------- FID and IS


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(50), rng.standard_normal(50)
    var1, var2 = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = evaluate.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariances():
    """tr((S1 S2)^1/2) = sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 200)), rng.standard_normal((40, 200)) * 1.3
    sigma1, sigma2 = np.cov(a), np.cov(b)
    mu1, mu2 = a.mean(1), b.mean(1)
    root1 = linalg.sqrtm(sigma1).real
    tr_covmean = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    assert evaluate.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert evaluate.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_singular_product_adds_eps(monkeypatch):
    calls = []
    real_sqrtm = linalg.sqrtm

    def sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(evaluate.linalg, "sqrtm", sqrtm)
    var = np.array([1.0, 2.0, 0.0])
    with pytest.warns(UserWarning, match="singular"):
        got = evaluate.frechet_distance(np.zeros(3), np.diag(var), np.zeros(3), np.diag(var))
    np.testing.assert_allclose(calls[1], np.diag((var + 1e-6) ** 2), rtol=1e-12)
    assert got == pytest.approx(np.sum(2 * var - 2 * (var + 1e-6)), abs=1e-12)


def test_frechet_distance_imaginary_part(monkeypatch):
    eye = np.eye(2)
    monkeypatch.setattr(evaluate.linalg, "sqrtm", lambda a: eye + 1e-5j)  # rounding noise: dropped
    assert evaluate.frechet_distance(np.zeros(2), eye, np.zeros(2), eye) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(evaluate.linalg, "sqrtm", lambda a: eye + 0.1j)
    with pytest.raises(ValueError) as error:
        evaluate.frechet_distance(np.zeros(2), eye, np.zeros(2), eye)
    assert_one_sentence(str(error.value), "imaginary")


def test_inception_score_over_several_splits():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((12, 10)) * 3
    softmax = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    expected = []
    for part in (softmax[0:5], softmax[5:10], softmax[10:12]):  # splits of 5: 5, 5 and the rest
        p_y = part.astype(np.float64).mean(0)
        expected.append(math.exp(np.mean(special.rel_entr(part.astype(np.float64), p_y).sum(1))))
    assert evaluate.inception_score(softmax, split_size=5) == pytest.approx(np.mean(expected), rel=1e-10)
    assert evaluate.inception_score(softmax, split_size=5) != pytest.approx(evaluate.inception_score(softmax, split_size=12))
    uniform = np.full((7, 10), 0.1, np.float32)
    assert evaluate.inception_score(uniform, split_size=3) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- precision and recall


def test_float16_distances_match_tf_graph_and_differ_from_float32():
    rng = np.random.default_rng(3)
    u, v = features(rng, 40, 64) * 3, features(rng, 30, 64) * 3
    got = evaluate.squared_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    expected = np_distances(u.astype(np.float16), v.astype(np.float16))
    np.testing.assert_allclose(got, expected, rtol=2**-10, atol=0)  # at most one float16 ulp apart
    assert (got == expected).mean() > 0.99
    exact = np_distances(u.astype(np.float64), v.astype(np.float64))
    assert np.abs(got - exact).max() > 1e-3  # float16 rounding is really there
    assert got.dtype == np.float32


def test_distances_fall_back_to_float32_when_float16_overflows():
    rng = np.random.default_rng(4)
    u, v = features(rng, 10, 64) * 100, features(rng, 12, 64) * 100  # |x|^2 ~ 3e5 > 65504
    got = evaluate.squared_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np_distances(u.astype(np.float64), v.astype(np.float64)), rtol=1e-4, atol=1.0)


@pytest.mark.parametrize("block", [1000, 7])
def test_precision_recall_against_brute_force(block):
    rng = np.random.default_rng(5)
    ref, sample = features(rng, 60, 16) * 3, features(rng, 45, 16, shift=0.4) * 3
    expected = brute_force_pr(ref, sample, block=block)
    got = evaluate.precision_recall(torch.from_numpy(ref), torch.from_numpy(sample), block=block)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_precision_recall_overflow_only_in_some_blocks():
    """ADM checks float16 overflow per distance block: blocks without it stay float16."""
    rng = np.random.default_rng(6)
    ref, sample = features(rng, 30, 16) * 3, features(rng, 24, 16, shift=0.3) * 3
    ref[20:] *= 200
    expected = brute_force_pr(ref, sample, block=10)
    got = evaluate.precision_recall(torch.from_numpy(ref), torch.from_numpy(sample), block=10)
    assert got == pytest.approx(expected, abs=1e-12)
    radii = evaluate.manifold_radii(torch.from_numpy(ref), block=10).numpy()
    expected = np.sort(np_block_distances(ref, ref, 10), axis=1)[:, 3]
    np.testing.assert_allclose(radii, expected, rtol=2**-10)  # float32 sums in another order
    assert radii[20:].max() > 65504  # those rows' radii came from float32 blocks
    np.testing.assert_array_equal(radii[:20].astype(np.float16).astype(np.float32), radii[:20])  # the others' from float16 ones


def test_k_nearest_neighbour_radius_is_third_neighbour_besides_itself():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    np.testing.assert_array_equal(evaluate.manifold_radii(points).numpy(), [36.0, 25.0, 9.0, 25.0, 81.0])


# ---------------------------------------------------------------- statistics precedence and checks


SMALL_DIMS = {"pool": 64, "spatial": 49, "softmax": 10}  # the metric code takes any width; the file checks ADM's


def acts(rng: np.random.Generator, n: int, stats: dict | None = None, shift: float = 0.0, dims: dict = SMALL_DIMS) -> Activations:
    softmax = rng.dirichlet(np.ones(dims["softmax"]), n).astype(np.float32)
    return Activations(features(rng, n, dims["pool"], shift), features(rng, n, dims["spatial"], shift), softmax, stats)


def diagonal_stats(rng: np.random.Generator, dims: dict = SMALL_DIMS) -> dict:
    return {
        "mu": rng.standard_normal(dims["pool"]), "sigma": np.diag(rng.uniform(0.5, 2, dims["pool"])),
        "mu_s": rng.standard_normal(dims["spatial"]), "sigma_s": np.diag(rng.uniform(0.5, 2, dims["spatial"])),
    }


def diagonal_fid(a: dict, b: dict, suffix: str = "") -> float:
    var_a, var_b = np.diag(a["sigma" + suffix]), np.diag(b["sigma" + suffix])
    return np.sum((a["mu" + suffix] - b["mu" + suffix]) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))


def test_stored_statistics_take_precedence_and_pool_still_gives_precision_recall(monkeypatch):
    """FID/sFID use stored mu/sigma of either file; precision and recall always use the pool features."""
    rng = np.random.default_rng(7)
    ref, sample = acts(rng, 20, diagonal_stats(rng)), acts(rng, 20, diagonal_stats(rng), shift=0.2)
    scores = evaluate.evaluate(ref, sample, torch.device("cpu"))
    assert scores["fid"] == pytest.approx(diagonal_fid(sample.stats, ref.stats), rel=1e-9)
    assert scores["sfid"] == pytest.approx(diagonal_fid(sample.stats, ref.stats, "_s"), rel=1e-9)
    assert (scores["precision"], scores["recall"]) == pytest.approx(brute_force_pr(ref.pool, sample.pool, block=10000))
    assert scores["inception_score"] == pytest.approx(evaluate.inception_score(sample.softmax))


def test_fewer_samples_than_dimensions_give_fid_and_a_warning():
    rng = np.random.default_rng(8)
    ref, sample = acts(rng, 20, diagonal_stats(rng)), acts(rng, 20)
    scores = evaluate.evaluate(ref, sample, torch.device("cpu"))
    sigma = np.cov(sample.pool.astype(np.float64), rowvar=False)
    assert np.linalg.matrix_rank(sigma) < 64  # singular, and the distance still defined
    expected = evaluate.frechet_distance(sample.pool.astype(np.float64).mean(0), sigma, ref.stats["mu"], ref.stats["sigma"])
    assert math.isfinite(scores["fid"]) and scores["fid"] == pytest.approx(expected, rel=1e-9)
    assert math.isfinite(scores["sfid"])
    assert evaluate.small_set_warning(ref, sample) == (
        "warning: FID (and sFID) from 20 sample images is biased upward; ADM's numbers use 50,000"
    )
    assert evaluate.small_set_warning(ref, acts(rng, 65)) is None  # more images than the 64 dimensions


def test_too_few_images_for_precision_and_recall_are_refused():
    rng = np.random.default_rng(8)
    with pytest.raises(ValueError) as error:
        evaluate.evaluate(acts(rng, 20), acts(rng, 3), torch.device("cpu"))
    assert_one_sentence(str(error.value), "the sample has 3 images; precision and recall need more than 3")


def save(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


ADM_DIMS = {"pool": 2048, "spatial": 2023, "softmax": 1008}


def test_activation_file_checks(tmp_path):
    rng = np.random.default_rng(9)
    a = acts(rng, 5, dims=ADM_DIMS)
    good = {"pool": a.pool, "spatial": a.spatial, "softmax": a.softmax}
    loaded = evaluate.load_activations(save(tmp_path / "good.npz", **good))
    np.testing.assert_array_equal(loaded.spatial, a.spatial)
    assert loaded.stats is None
    cases = {
        "missing": ({"pool": a.pool, "softmax": a.softmax}, "lacks spatial"),
        "float64": ({**good, "pool": a.pool.astype(np.float64)}, "pool must be float32"),
        "short": ({**good, "softmax": a.softmax[:4]}, "softmax must be float32 of shape (N, 1008)"),
        "width": ({**good, "spatial": a.spatial[:, :2000]}, "spatial"),
        "partial_stats": ({**good, "mu": np.zeros(2048)}, "not sigma, mu_s, sigma_s"),
        "stats_shape": ({**good, **diagonal_stats(rng, ADM_DIMS), "mu_s": np.zeros(2048)}, "mu_s must be"),
    }
    for name, (arrays, needle) in cases.items():
        with pytest.raises(ValueError) as error:
            evaluate.load_activations(save(tmp_path / f"{name}.npz", **arrays))
        assert_one_sentence(str(error.value), needle)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError) as error:
        evaluate.is_image_batch(str(tmp_path / "junk.npz"))
    assert_one_sentence(str(error.value), "not a readable .npz")


def test_reads_the_npz_that_sample_ddp_streams(tmp_path):
    """sample_ddp.py writes arr_0 into the archive itself (zip64, no compression); read it in batches."""
    from PIL import Image

    import sample_ddp

    images = np.random.default_rng(14).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(sample_ddp.png_path(str(folder), index))
    path = sample_ddp.write_npz(str(folder), 5, 8, np.arange(5) % 3)
    assert evaluate.is_image_batch(path) and evaluate.num_images(path) == 5
    np.testing.assert_array_equal(np.concatenate(list(evaluate.image_batches(path, 2))), images)


def test_image_batch_checks(tmp_path):
    for name, array, needle in [
        ("float", np.zeros((2, 8, 8, 3), np.float32), "uint8"),
        ("gray", np.zeros((2, 8, 8), np.uint8), "(N, H, W, 3)"),
        ("empty", np.zeros((0, 8, 8, 3), np.uint8), "N >= 1"),
    ]:
        path = save(tmp_path / f"{name}.npz", arr_0=array)
        assert evaluate.is_image_batch(path)
        with pytest.raises(ValueError) as error:
            next(evaluate.image_batches(path, 4))
        assert_one_sentence(str(error.value), needle)
    path = save(tmp_path / "damaged.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    data = bytearray((tmp_path / "damaged.npz").read_bytes())
    data[200] ^= 0xFF  # inside arr_0's pixels: the archive's CRC no longer matches
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError) as error:
        list(evaluate.image_batches(path, 2))
    assert_one_sentence(str(error.value), "damaged")


# ---------------------------------------------------------------- the network


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> str:
    """torch-fidelity's Inception with random weights (He-scaled convs, random batch-norm
    statistics, a non-zero fc bias), saved as a weights file: nothing is downloaded."""
    from torch_fidelity import feature_extractor_inceptionv3 as module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        model = module.FeatureExtractorInceptionV3("random", ["2048"])
    generator = torch.Generator().manual_seed(0)
    state = model.state_dict()
    for name, tensor in state.items():
        if tensor.dim() == 4:  # conv weights: keep activations at unit scale through 94 layers
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * math.sqrt(2 / tensor[0].numel()))
        elif name.endswith(("running_mean", "bn.bias", "fc.bias")):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        elif name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        elif name == "fc.weight":
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def model(random_weights):
    return evaluate.build_inception(evaluate.resolve_inception_weights(random_weights), torch.device("cpu"))


@pytest.mark.slow
def test_network_outputs_are_adm_layers(model):
    """pool_3, the bias-free 1008-way softmax, and mixed_6/conv = the first channels of Mixed_6d's output."""
    images = torch.from_numpy(np.random.default_rng(10).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    mixed_6 = {}
    hook = model.Mixed_6d.register_forward_hook(lambda module, inputs, output: mixed_6.update(out=output))
    try:
        out = evaluate.inception_activations(model, images)
    finally:
        hook.remove()
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and out["softmax"].shape == (2, 1008)
    # TF's concat puts the 1x1 branch first, so mixed_6's first 7 channels are mixed_6/conv's.
    assert mixed_6["out"].shape[1:] == (768, 17, 17)
    expected_spatial = mixed_6["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    torch.testing.assert_close(out["spatial"], expected_spatial, rtol=0, atol=0)
    assert out["spatial"].std() > 0.1  # the random network is not degenerate
    torch.testing.assert_close(out["softmax"], F.softmax(out["pool"] @ model.fc.weight.T, dim=1), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out["softmax"], F.softmax(model.fc(out["pool"]), dim=1), rtol=1e-3, atol=1e-6)
    pool_alone = model(images.permute(0, 3, 1, 2))[0]  # torch-fidelity's own pool_3 output
    torch.testing.assert_close(out["pool"], pool_alone)


def test_flatten_spatial_is_height_width_channel_order():
    maps = torch.arange(2 * 9 * 17 * 17, dtype=torch.float32).reshape(2, 9, 17, 17)
    flat = evaluate.flatten_spatial(maps)
    assert flat.shape == (2, 2023)
    for n, h, w, c in [(0, 0, 0, 1), (1, 0, 1, 0), (0, 5, 11, 6), (1, 16, 16, 6)]:
        assert flat[n, (h * 17 + w) * 7 + c] == maps[n, c, h, w]


@pytest.mark.slow
def test_image_batch_activations_are_streamed_and_saved(tmp_path, model):
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    stored = diagonal_stats(rng, ADM_DIMS)
    path = save(tmp_path / "images.npz", arr_0=images, **stored)
    got = evaluate.compute_activations(path, model, torch.device("cpu"), batch_size=2)
    whole = evaluate.inception_activations(model, torch.from_numpy(images))
    for key in ("pool", "spatial", "softmax"):
        np.testing.assert_allclose(getattr(got, key), whole[key].numpy(), rtol=1e-5, atol=1e-6)
    evaluate.save_activations(got, evaluate.activation_path(path))
    again = evaluate.load_activations(str(tmp_path / "images_inception.npz"))
    np.testing.assert_array_equal(again.pool, got.pool)
    np.testing.assert_array_equal(again.stats["sigma_s"], stored["sigma_s"])


def test_offline_without_weights_is_one_sentence(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError) as error:
        evaluate.resolve_inception_weights(None)
    assert_one_sentence(str(error.value), evaluate.WEIGHTS_FILE, evaluate.WEIGHTS_URL, "--inception-weights")
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError) as error:
        evaluate.resolve_inception_weights(str(tmp_path / "bad.pth"))
    assert_one_sentence(str(error.value), "bad.pth", evaluate.WEIGHTS_FILE)


# ---------------------------------------------------------------- the command line


def test_cli_on_activation_files_writes_json(tmp_path, capsys, monkeypatch):
    for key, dim in SMALL_DIMS.items():  # small files: the file checks with ADM's widths are tested above
        monkeypatch.setitem(evaluate.ACTIVATION_DIMS, key, dim)
    for key, dim in (("mu", 64), ("sigma", (64, 64)), ("mu_s", 49), ("sigma_s", (49, 49))):
        monkeypatch.setitem(evaluate.STAT_SHAPES, key, dim if isinstance(dim, tuple) else (dim,))
    rng = np.random.default_rng(12)
    ref, sample = acts(rng, 12, diagonal_stats(rng)), acts(rng, 9, diagonal_stats(rng), shift=0.3)
    paths = [
        save(tmp_path / f"{name}.npz", pool=a.pool, spatial=a.spatial, softmax=a.softmax, **a.stats)
        for name, a in (("ref", ref), ("sample", sample))
    ]
    evaluate.main([*paths, "--json", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert set(scores) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert scores["fid"] == pytest.approx(diagonal_fid(sample.stats, ref.stats), rel=1e-9)
    assert scores["sfid"] == pytest.approx(diagonal_fid(sample.stats, ref.stats, "_s"), rel=1e-9)
    p_y = sample.softmax.astype(np.float64).mean(0)
    expected_is = math.exp(np.mean(special.rel_entr(sample.softmax.astype(np.float64), p_y).sum(1)))
    assert scores["inception_score"] == pytest.approx(expected_is, rel=1e-9)
    assert (scores["precision"], scores["recall"]) == pytest.approx(brute_force_pr(ref.pool, sample.pool, block=10000))
    assert f"FID: {scores['fid']}" in capsys.readouterr().out


def test_cli_bad_input_exits_with_one_sentence(tmp_path):
    path = save(tmp_path / "x.npz", something=np.zeros(3))
    with pytest.raises(SystemExit) as error:
        evaluate.main([path, path])
    assert_one_sentence(str(error.value), "evaluate.py: error:", "lacks pool, spatial, softmax")


@pytest.mark.slow
def test_cli_on_image_batches_saves_activations_that_score_the_same(tmp_path, random_weights, monkeypatch):
    for key, dim in (("mu", 64), ("sigma", (64, 64)), ("mu_s", 49), ("sigma_s", (49, 49))):
        monkeypatch.setitem(evaluate.STAT_SHAPES, key, dim if isinstance(dim, tuple) else (dim,))
    rng = np.random.default_rng(13)
    ref_stats, sample_stats = diagonal_stats(rng), diagonal_stats(rng)
    ref = save(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8), **ref_stats)
    sample = save(tmp_path / "sample.npz", arr_0=rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8), **sample_stats)
    common = ["--inception-weights", random_weights, "--batch-size", "3"]
    evaluate.main([ref, sample, *common, "--save-activations", "--json", str(tmp_path / "images.json")])
    from_images = json.loads((tmp_path / "images.json").read_text())
    assert from_images["fid"] == pytest.approx(diagonal_fid(sample_stats, ref_stats), rel=1e-9)
    activation_files = [str(tmp_path / "ref_inception.npz"), str(tmp_path / "sample_inception.npz")]
    evaluate.main([*activation_files, "--json", str(tmp_path / "activations.json")])
    assert json.loads((tmp_path / "activations.json").read_text()) == from_images


def projection_inception(monkeypatch, dims: dict) -> list[int]:
    """The Inception pass replaced by a fixed random projection of the pixels to `dims` (the real
    network on hundreds of images takes minutes on a CPU); returns the list of images it saw."""
    seen = []
    weights = {key: torch.randn(12, dim, generator=torch.Generator().manual_seed(len(key))) for key, dim in dims.items()}

    def activations(model, images):
        seen.append(len(images))
        colours = images.float().reshape(len(images), 2, 16, 2, 16, 3).mean(dim=(2, 4)).reshape(len(images), 12) / 255
        out = {key: torch.relu(colours @ weight + torch.rand(len(images), weight.shape[1])) for key, weight in weights.items()}
        return {**out, "softmax": F.softmax(out["softmax"], dim=1)}

    monkeypatch.setattr(evaluate, "resolve_inception_weights", lambda path: "weights")
    monkeypatch.setattr(evaluate, "build_inception", lambda path, device: "model")
    monkeypatch.setattr(evaluate, "inception_activations", activations)
    return seen


@pytest.mark.slow
def test_cli_on_500_images_gives_every_number_and_one_warning(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    projection_inception(monkeypatch, {"pool": 512, "spatial": 507, "softmax": 10})  # 500 images <= 512 dimensions
    rng = np.random.default_rng(15)
    ref = save(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8))
    sample = save(tmp_path / "sample.npz", arr_0=rng.integers(0, 200, (500, 32, 32, 3), dtype=np.uint8))
    evaluate.main([ref, sample, "--batch-size", "250", "--json", str(tmp_path / "scores.json")])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert all(math.isfinite(value) for value in scores.values()), scores
    assert scores["fid"] > 0 and scores["inception_score"] >= 1 and 0 <= scores["precision"] <= 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "arning" in line] == [
        "warning: FID (and sFID) from 500 sample images is biased upward; ADM's numbers use 50,000"
    ]


@pytest.mark.parametrize("ref_kind", ["images", "activations"])
def test_a_batch_too_small_for_anything_fails_before_the_inception_pass(tmp_path, monkeypatch, ref_kind):
    seen = projection_inception(monkeypatch, {"pool": 16, "spatial": 16, "softmax": 10})
    rng = np.random.default_rng(16)
    if ref_kind == "images":
        ref = save(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    else:
        a = acts(rng, 40, dims=ADM_DIMS)
        ref = save(tmp_path / "ref.npz", pool=a.pool, spatial=a.spatial, softmax=a.softmax)
    sample = save(tmp_path / "sample.npz", arr_0=rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as error:
        evaluate.main([ref, sample])
    assert_one_sentence(str(error.value), "evaluate.py: error: the sample", "has 1 image; precision and recall need more than 3")
    assert seen == []  # not even the reference went through the network


# ---------------------------------------------------------------- non-finite inputs


def test_one_nan_in_an_activation_file_is_one_sentence_before_any_metric(tmp_path, monkeypatch):
    """pool[5, 7] = NaN: refused before any metric (scipy's sqrtm spins for many minutes on it)."""
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *args: pytest.fail("a metric ran on NaN activations"))
    rng = np.random.default_rng(17)
    ref, sample = acts(rng, 12, dims=ADM_DIMS), acts(rng, 12, dims=ADM_DIMS)
    sample.pool[5, 7] = np.nan
    ref_path = save(tmp_path / "ref.npz", pool=ref.pool, spatial=ref.spatial, softmax=ref.softmax)
    sample_path = save(tmp_path / "sample.npz", pool=sample.pool, spatial=sample.spatial, softmax=sample.softmax)
    with pytest.raises(SystemExit) as error:
        evaluate.main([ref_path, sample_path])
    assert_one_sentence(str(error.value), sample_path, "pool holds 1 non-finite value(s) (NaN or inf) in 1 of its 12 rows")


def test_infinite_stored_statistics_are_refused_naming_the_array(tmp_path):
    rng = np.random.default_rng(18)
    a = acts(rng, 5, dims=ADM_DIMS)
    stats = diagonal_stats(rng, ADM_DIMS)
    stats["sigma"][3, :2] = np.inf
    path = save(tmp_path / "stats.npz", pool=a.pool, spatial=a.spatial, softmax=a.softmax, **stats)
    with pytest.raises(ValueError) as error:
        evaluate.load_activations(path)
    assert_one_sentence(str(error.value), path, "sigma holds 2 non-finite value(s)", "in 1 of its 2,048 rows")


def test_frechet_distance_refuses_nan_statistics_instead_of_calling_sqrtm(monkeypatch):
    monkeypatch.setattr(evaluate.linalg, "sqrtm", lambda matrix: pytest.fail("sqrtm ran on NaN statistics"))
    sigma = np.eye(4)
    with pytest.raises(ValueError) as error:
        evaluate.frechet_distance(np.zeros(4), sigma, np.array([0, np.nan, 0, 0]), sigma)
    assert_one_sentence(str(error.value), "mu2 holds 1 non-finite value(s)")


def test_non_finite_inception_activations_name_the_image_batch(tmp_path, monkeypatch):
    projection_inception(monkeypatch, {"pool": 16, "spatial": 16, "softmax": 10})
    real = evaluate.inception_activations
    monkeypatch.setattr(evaluate, "inception_activations", lambda model, images: {**real(model, images), "pool": torch.full((len(images), 16), np.inf)})
    rng = np.random.default_rng(19)
    path = save(tmp_path / "images.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError) as error:
        evaluate.compute_activations(path, "model", torch.device("cpu"), 4)
    assert_one_sentence(str(error.value), f"the Inception activations of {path}: pool holds 96 non-finite value(s)")


@pytest.mark.parametrize("problem", ["float images", "nan activations", "partial statistics"])
def test_a_bad_sample_is_refused_before_the_reference_goes_through_inception(tmp_path, monkeypatch, problem):
    seen = projection_inception(monkeypatch, {"pool": 16, "spatial": 16, "softmax": 10})
    rng = np.random.default_rng(20)
    ref = save(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    if problem == "float images":
        sample, needle = save(tmp_path / "sample.npz", arr_0=np.zeros((8, 32, 32, 3), np.float32)), "arr_0 must be a C-ordered uint8"
    elif problem == "nan activations":
        a = acts(rng, 8, dims=ADM_DIMS)
        a.softmax[2] = np.nan
        sample, needle = save(tmp_path / "sample.npz", pool=a.pool, spatial=a.spatial, softmax=a.softmax), "softmax holds 1,008"
    else:
        images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        sample, needle = save(tmp_path / "sample.npz", arr_0=images, mu=np.zeros(2048)), "FID statistics need all four"
    with pytest.raises(SystemExit) as error:
        evaluate.main([ref, sample])
    assert_one_sentence(str(error.value), "evaluate.py: error:", needle)
    assert seen == []  # the reference's Inception pass did not start
