"""The dual-codebook quantizer: shared index, straight-through gradients, EMA, restarts, entropy, usage."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer_vision import TokenizerConfig
from tokenizer_vision import quantizer as quantizer_module
from tokenizer_vision.quantizer import DualCodebookQuantizer

D_SEM, D_PIX, K = 8, 4, 64  # the tiny size


def make_quantizer(**overrides) -> DualCodebookQuantizer:
    return DualCodebookQuantizer(TokenizerConfig.from_name("tiny", **overrides))


def unit_rows(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B*h*w, d), l2-normalised, raster order."""
    return F.normalize(feature_map.float().permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1]), dim=-1)


def brute_force_distances(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, d), (K, d) -> (N, K) squared euclidean distances of the normalised vectors, by broadcasting."""
    return (features[:, None, :] - F.normalize(codebook.float(), dim=-1)[None]).pow(2).sum(-1)


def features(batch=3):
    return torch.randn(batch, D_SEM, 4, 4), torch.randn(batch, D_PIX, 4, 4)


@pytest.mark.parametrize("w_sem, w_pix", [(1.0, 1.0), (2.0, 0.5), (0.25, 3.0)])
def test_shared_index_minimises_the_weighted_distance(w_sem, w_pix):
    quantizer = make_quantizer(w_sem=w_sem, w_pix=w_pix).eval()
    z_sem, z_pix = features()
    out = quantizer(z_sem, z_pix)

    d_sem = brute_force_distances(unit_rows(z_sem), quantizer.codebook_sem)  # (N, K)
    d_pix = brute_force_distances(unit_rows(z_pix), quantizer.codebook_pix)
    expected = (w_sem * d_sem + w_pix * d_pix).argmin(1)
    assert out.indices.shape == (3, 4, 4) and out.indices.dtype == torch.long
    assert torch.equal(out.indices.flatten(), expected)
    # The shared index is a compromise: it differs from what either branch alone would pick.
    assert not torch.equal(expected, d_sem.argmin(1)) and not torch.equal(expected, d_pix.argmin(1))


@pytest.mark.parametrize("mode, active", [("pixel", "pix"), ("semantic", "sem")])
def test_single_branch_modes_use_only_their_codebook(mode, active):
    quantizer = make_quantizer(quantizer_mode=mode).eval()
    inactive = "sem" if active == "pix" else "pix"
    assert quantizer.codebook(inactive) is None
    z = dict(zip(("sem", "pix"), features()))
    out = quantizer(z["sem"] if active == "sem" else None, z["pix"] if active == "pix" else None)
    expected = brute_force_distances(unit_rows(z[active]), quantizer.codebook(active)).argmin(1)
    assert torch.equal(out.indices.flatten(), expected)
    assert getattr(out, f"quantized_{inactive}") is None
    assert getattr(out, f"quantized_{active}").shape == z[active].shape


def test_chunked_search_matches_one_pass(monkeypatch):
    quantizer = make_quantizer().eval()
    z_sem, z_pix = features(batch=5)
    whole = quantizer(z_sem, z_pix).indices
    monkeypatch.setattr(quantizer_module, "_DISTANCE_CHUNK_ELEMENTS", 7 * K)  # 7 positions per chunk
    assert torch.equal(quantizer(z_sem, z_pix).indices, whole)


def test_bf16_code_search_picks_a_near_best_code_in_training_and_the_best_outside_it():
    # K large enough for near ties, as at the photo size; restarts off so the codebook stays as built.
    quantizer = make_quantizer(training_code_search="bf16", codebook_size=4096, restart_every=0, ema_decay=0.0)
    z_sem, z_pix = features(batch=8)
    codebooks = quantizer.codebook_sem.detach().clone(), quantizer.codebook_pix.detach().clone()
    scores = unit_rows(z_sem) @ F.normalize(codebooks[0], dim=-1).t() + unit_rows(z_pix) @ F.normalize(
        codebooks[1], dim=-1
    ).t()  # (N, K) fp32: the larger, the nearer
    best = scores.argmax(1)
    trained = quantizer.train()(z_sem, z_pix).indices.flatten()  # a training step: bf16 scores
    chosen = scores.gather(1, trained[:, None]).squeeze(1)
    assert (scores.max(1).values - chosen).max() < 0.02  # never far from the best: bf16 rounding only
    assert (trained == best).float().mean() > 0.5  # and mostly the best itself
    assert not torch.equal(trained, best)  # K = 4096 of 12 dims: some near ties go the other way
    quantizer.codebook_sem.data.copy_(codebooks[0])  # undo the EMA step, then encode as inference does
    quantizer.codebook_pix.data.copy_(codebooks[1])
    assert torch.equal(quantizer.eval()(z_sem, z_pix).indices.flatten(), best)  # fp32 outside training


def test_distances_are_fp32_under_bf16_autocast():
    quantizer = make_quantizer().eval()
    z_sem, z_pix = (z.bfloat16() for z in features())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z_sem, z_pix)
    d = brute_force_distances(unit_rows(z_sem), quantizer.codebook_sem) + brute_force_distances(
        unit_rows(z_pix), quantizer.codebook_pix
    )
    assert torch.equal(out.indices.flatten(), d.argmin(1))
    assert out.quantized_sem.dtype == torch.bfloat16 and out.commitment_loss.dtype == torch.float32


def test_straight_through_values_and_gradients():
    quantizer = make_quantizer().eval()
    z_sem, z_pix = (z.requires_grad_() for z in features(batch=2))
    out = quantizer(z_sem, z_pix)
    indices = out.indices.flatten()
    # Forward: exactly the (normalised) codebook rows of the shared index, for both branches.
    rows_sem = F.normalize(quantizer.codebook_sem, dim=-1)[indices]
    assert torch.allclose(out.quantized_sem.permute(0, 2, 3, 1).reshape(-1, D_SEM), rows_sem, atol=1e-6)
    # Backward: the identity onto the (normalised) encoder features.
    weights = torch.randn_like(out.quantized_sem)
    (out.quantized_sem * weights).sum().backward()
    expected = torch.autograd.grad((F.normalize(z_sem, dim=1) * weights).sum(), z_sem)[0]
    assert z_sem.grad.abs().sum() > 0
    assert torch.allclose(z_sem.grad, expected, atol=1e-6)


def test_ema_update_moves_used_codes_toward_their_features():
    decay = 0.9
    quantizer = make_quantizer(ema_decay=decay, restart_every=0).train()
    assert not quantizer.codebook_sem.requires_grad  # EMA codebooks are state, not trained weights
    old = {b: quantizer.codebook(b).detach().clone() for b in ("sem", "pix")}
    z = dict(zip(("sem", "pix"), features(batch=4)))
    out = quantizer(z["sem"], z["pix"])
    indices = out.indices.flatten()
    counts = torch.bincount(indices, minlength=K).float()
    used = counts > 0
    assert out.codebook_loss.item() == 0.0

    cluster_size = (1 - decay) * counts
    total = cluster_size.sum()
    smoothed = (cluster_size + 1e-5) / (total + K * 1e-5) * total
    for branch in ("sem", "pix"):
        rows = unit_rows(z[branch])
        sums = torch.zeros_like(old[branch]).index_add_(0, indices, rows)
        expected = F.normalize((decay * old[branch] + (1 - decay) * sums) / smoothed[:, None], dim=-1)
        new = quantizer.codebook(branch).detach()
        assert torch.allclose(new, expected, atol=1e-5)
        assert torch.allclose(new[~used], old[branch][~used], atol=1e-5)  # unused codes keep their direction
        centroids = F.normalize(sums[used], dim=-1)
        before = (old[branch][used] * centroids).sum(-1)
        after = (new[used] * centroids).sum(-1)
        assert (after > before).all()  # every used code moved toward the mean of its features


def test_no_update_in_eval_mode_or_without_grad():
    quantizer = make_quantizer().train()
    state = {k: v.clone() for k, v in quantizer.state_dict().items() if k != "usage_counts"}
    with torch.no_grad():
        quantizer(*features())
    quantizer.eval()
    quantizer(*features())
    for key, value in state.items():
        assert torch.equal(quantizer.state_dict()[key], value), key


def test_dead_code_restart_takes_features_of_the_same_positions():
    quantizer = make_quantizer(restart_every=0).train()
    quantizer.ema_cluster_size.fill_(5.0)
    dead = torch.tensor([3, 10, 42])
    quantizer.ema_cluster_size[dead] = 0.0
    before = {b: quantizer.codebook(b).detach().clone() for b in ("sem", "pix")}
    z_sem, z_pix = features(batch=2)

    assert quantizer.restart_dead_codes(z_sem, z_pix) == 3
    rows_sem, rows_pix = unit_rows(z_sem), unit_rows(z_pix)
    chosen = []
    for code in dead.tolist():
        same_sem = (rows_sem == quantizer.codebook_sem[code]).all(1)
        same_pix = (rows_pix == quantizer.codebook_pix[code]).all(1)
        position = (same_sem & same_pix).nonzero().flatten()
        assert position.numel() == 1  # both rows come from one and the same batch position
        chosen.append(position.item())
    assert len(set(chosen)) == 3
    assert (quantizer.ema_cluster_size[dead] > 0).all()
    alive = torch.ones(K, dtype=torch.bool)
    alive[dead] = False
    for branch in ("sem", "pix"):
        assert torch.equal(quantizer.codebook(branch)[alive], before[branch][alive])
    # The revived codes are the nearest codes of the positions they came from.
    indices = quantizer.eval()(z_sem, z_pix).indices.flatten()
    assert indices[chosen].tolist() == dead.tolist()


def assert_codes_sit_on_batch_positions(quantizer, codes, z_sem, z_pix):
    """Each code equals the features of one batch position, the same position in both codebooks."""
    rows_sem, rows_pix = unit_rows(z_sem), unit_rows(z_pix)
    for code in codes:
        position = (rows_sem @ quantizer.codebook_sem[code]).argmax()
        assert torch.allclose(quantizer.codebook_sem[code], rows_sem[position], atol=1e-5)
        assert torch.allclose(quantizer.codebook_pix[code], rows_pix[position], atol=1e-5)


def test_restarts_initialise_from_data_then_run_every_restart_every_steps():
    quantizer = make_quantizer(restart_every=3).train()
    first, second = features(batch=1), features(batch=1)  # 16 positions, 64 codes

    # Step 1: every code is unused, so all start from this batch's features. (Codes assigned in the
    # same step have already moved by their EMA update; the others must sit exactly on a position.)
    assigned = set(quantizer(*first).indices.flatten().tolist())
    assert_codes_sit_on_batch_positions(quantizer, set(range(K)) - assigned, *first)
    assert (quantizer.ema_cluster_size >= 0.01 * 0.99).all()

    quantizer(*second)  # step 2: no restart
    unused = set((quantizer.ema_cluster_size < 0.01).nonzero().flatten().tolist())
    assert 30 < len(unused) < K
    assigned = set(quantizer(*second).indices.flatten().tolist())  # step 3: restart, then assign
    assert int(quantizer.num_training_steps) == 3
    assert assigned & unused  # restarted codes are used by the batch they came from
    assert_codes_sit_on_batch_positions(quantizer, unused - assigned, *second)
    assert (quantizer.ema_cluster_size >= 0.01 * 0.99).all()


def test_loss_mode_trains_codebooks_by_gradient():
    quantizer = make_quantizer(codebook_update="loss", restart_every=0).train()
    assert quantizer.codebook_sem.requires_grad and quantizer.codebook_pix.requires_grad
    out = quantizer(*features())
    assert out.codebook_loss.item() > 0
    assert torch.allclose(out.vq_loss, out.codebook_loss + 0.25 * out.commitment_loss)
    out.vq_loss.backward()
    used = torch.bincount(out.indices.flatten(), minlength=K) > 0
    grad_norms = quantizer.codebook_sem.grad.norm(dim=1)
    assert (grad_norms[used] > 0).all() and (grad_norms[~used] == 0).all()


def orthonormal_quantizer(**overrides) -> DualCodebookQuantizer:
    """K = 4 codes: basis vectors in both codebooks, so distances are exactly 0 or 2."""
    quantizer = make_quantizer(codebook_size=4, **overrides)
    with torch.no_grad():
        quantizer.codebook_sem.copy_(torch.eye(4, D_SEM))
        quantizer.codebook_pix.copy_(torch.eye(4, D_PIX))
    return quantizer


def features_of_codes(codes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features equal to the given codes, as a (1, d, 1, len(codes)) map."""
    z_sem = torch.eye(4, D_SEM)[codes].T.reshape(1, D_SEM, 1, len(codes))
    z_pix = torch.eye(4, D_PIX)[codes].T.reshape(1, D_PIX, 1, len(codes))
    return z_sem, z_pix


def test_entropy_loss_rewards_confident_and_diverse_assignments():
    quantizer = orthonormal_quantizer(entropy_loss_weight=1.0, restart_every=0).train()
    diverse = quantizer(*features_of_codes([0, 1, 2, 3]))
    assert diverse.entropy_loss.item() == pytest.approx(-math.log(4), abs=1e-4)
    collapsed = quantizer(*features_of_codes([0, 0, 0, 0]))
    assert collapsed.entropy_loss.item() == pytest.approx(0.0, abs=1e-4)
    z_sem, z_pix = (z.requires_grad_() for z in features())
    make_quantizer(entropy_loss_weight=1.0).train()(z_sem, z_pix).entropy_loss.backward()
    assert z_sem.grad.abs().sum() > 0
    assert make_quantizer().train()(*features()).entropy_loss.item() == 0.0  # off by default


def test_usage_statistics():
    quantizer = orthonormal_quantizer().eval()
    out = quantizer(*features_of_codes([0, 0, 1, 1]))
    assert out.indices.flatten().tolist() == [0, 0, 1, 1]
    assert out.usage_fraction.item() == 0.5 and out.perplexity.item() == pytest.approx(2.0)
    quantizer(*features_of_codes([2, 2, 2, 2]))
    assert quantizer.usage_fraction() == 0.75
    assert quantizer.perplexity == pytest.approx(math.exp(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))))
    quantizer.reset_usage()
    assert quantizer.usage_fraction() == 0.0 and quantizer.perplexity == 0.0


def test_lookup_returns_unit_rows_of_any_index_shape():
    quantizer = make_quantizer()
    codes = torch.randint(0, K, (2, 3, 5))
    sem, pix = quantizer.lookup(codes)
    assert sem.shape == (2, 3, 5, D_SEM) and pix.shape == (2, 3, 5, D_PIX)
    assert torch.allclose(sem.norm(dim=-1), torch.ones(2, 3, 5))
    assert torch.equal(pix[1, 2, 4], F.normalize(quantizer.codebook_pix[codes[1, 2, 4]], dim=0))


def test_common_codes_are_preferred_among_near_equal_ones_outside_training():
    """code_preference_margin: outside training steps, among the codes within the margin of the nearest,
    the most counted one is chosen; beyond the margin, or with equal counts, the nearest."""
    # Codebooks that a training step leaves in place (no EMA move, no restarts).
    quantizer = make_quantizer(code_preference_margin=0.3, codebook_update="loss", restart_every=0).eval()
    codebook = torch.eye(4, D_SEM)
    with torch.no_grad():
        quantizer.codebook_sem[:4] = codebook
        quantizer.codebook_sem[4:] = -torch.eye(4, D_SEM).repeat(15, 1)[: K - 4]  # far from every feature
        quantizer.codebook_pix.zero_()
        quantizer.codebook_pix[:, 0] = 1.0  # the pixel branch ranks every code alike
    # Features near code 0, leaning toward code 1 by a little (distance gap 0.2) and code 2 by a lot (> 0.3).
    lean = torch.tensor([[1.0, 0.9, 0.0, 0.0], [1.0, 0.0, 0.3, 0.0]])
    z_sem = F.pad(lean, (0, D_SEM - 4)).view(2, D_SEM, 1, 1)
    z_pix = torch.zeros(2, D_PIX, 1, 1)
    z_pix[:, 0] = 1.0
    sem_rows = unit_rows(z_sem)
    gaps = (2 - 2 * sem_rows @ codebook.T)  # (2, 4) distances to codes 0-3
    assert gaps[0, 1] - gaps[0, 0] < 0.3 < gaps[1, 2] - gaps[1, 0]
    assert quantizer(z_sem, z_pix).indices.flatten().tolist() == [0, 0]  # zero counts: the nearest
    counts = torch.zeros(K)
    counts[1], counts[2], counts[0] = 50.0, 80.0, 10.0
    quantizer.set_code_preference(counts)
    assert quantizer(z_sem, z_pix).indices.flatten().tolist() == [1, 0]
    assert quantizer.train()(z_sem, z_pix).indices.flatten().tolist() == [0, 0]  # training steps: the nearest
    with torch.no_grad():  # encoding in train mode without gradients is not a training step
        assert quantizer(z_sem, z_pix).indices.flatten().tolist() == [1, 0]
    with pytest.raises(ValueError, match="expected 64 code counts"):
        quantizer.set_code_preference(torch.zeros(3))
    plain = make_quantizer(codebook_update="loss", restart_every=0).eval()  # margin 0: the nearest always
    plain.load_state_dict(quantizer.state_dict())
    assert plain(z_sem, z_pix).indices.flatten().tolist() == [0, 0]
    with pytest.raises(ValueError, match="code_preference_margin must be >= 0"):
        make_quantizer(code_preference_margin=-0.1)
