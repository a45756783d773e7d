"""The dual-codebook vector quantizer: one shared index into a semantic and a pixel codebook.

Follows TokenFlow (Qu et al., 2024, "TokenFlow: Unified Image Tokenizer for Multimodal Understanding
and Generation"): a semantic feature z_sem (distilled from a CLIP/SigLIP teacher) and a pixel feature
z_pix are quantized by two codebooks of the same size K that share ONE index

    k* = argmin_k  w_sem * ||z_sem - e_sem[k]||^2  +  w_pix * ||z_pix - e_pix[k]||^2

so a single id carries both a code that is good for understanding (e_sem[k]) and one that is good
for reconstruction (e_pix[k]). Features and codes are l2-normalised (cosine geometry, as in ViT-VQGAN
and TokenFlow), which keeps the two distances on the same [0, 4] scale whatever d_sem and d_pix are.

`mode="pixel"` keeps only the pixel branch (a classic VQGAN quantizer) and `mode="semantic"` only the
semantic one (SEED-like); the inactive codebook is not created.

Training signals, all in this file:
* straight-through estimator: the decoder sees e[k*] while gradients flow to z (van den Oord 2017);
* commitment loss beta * ||z - sg(e[k*])||^2;
* codebook learning either by gradient (||sg(z) - e[k*]||^2) or by exponential moving averages of
  cluster sizes and embedding sums with Laplace smoothing (VQ-VAE-2), renormalised to the sphere;
* dead-code restart: at the first training step (a data-dependent init: every code is unused then)
  and every `restart_every` steps, codes whose EMA usage is below `dead_code_threshold` take the
  features of randomly chosen positions of the current batch; both codebooks take the features of
  the SAME positions so the restarted pair stays consistent;
* optional entropy loss on soft assignments: confident per position, spread over the codebook
  (the entropy penalty of MAGVIT-v2 / LFQ, applied to distances here).

Shapes: B batch, h x w code grid, N = B * h * w positions, K codebook size, d_b a branch's width.
Distances and assignments are computed in fp32 even under bf16 autocast: bf16 would flip near ties. A
training config may ask for bf16 scores in training steps only (`training_code_search="bf16"`), where a
near tie going either way costs nothing and the search is the costliest part of a CPU step at K = 16384.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer_vision.config import TokenizerConfig

# Rows of the (positions x K) score matrix handled at once by `nearest_codes`: caps that temporary at 16M
# fp32 values (64 MB) instead of N * K (e.g. 8192 x 16384 = 512 MB for the base size).
_DISTANCE_CHUNK_ELEMENTS = 1 << 24
# On a CPU, 1M values (4 MB): small enough that argmax reads the scores back from cache. On 2 cores, a
# tokenizer-photo training step (2048 positions, K = 16384) took 330 ms in chunks of 64 rows against 390 ms
# in chunks of 1024 (docs/experiments.md).
_CPU_DISTANCE_CHUNK_ELEMENTS = 1 << 20
# Laplace smoothing of the EMA cluster sizes (as in Sonnet's / VQ-VAE-2's EMA quantizer).
_LAPLACE_EPSILON = 1e-5
_BRANCHES_BY_MODE = {"dual": ("sem", "pix"), "pixel": ("pix",), "semantic": ("sem",)}


@dataclass
class QuantizerOutput:
    indices: torch.Tensor  # (B, h, w) int64: the shared code index
    quantized_sem: torch.Tensor | None  # (B, d_sem, h, w): value e_sem[k*], gradient to z_sem (STE)
    quantized_pix: torch.Tensor | None  # (B, d_pix, h, w): value e_pix[k*], gradient to z_pix (STE)
    vq_loss: torch.Tensor  # (): codebook_loss + beta * commitment_loss
    codebook_loss: torch.Tensor  # (): sum over branches of ||sg(z) - e||^2; zero with EMA updates
    commitment_loss: torch.Tensor  # (): sum over branches of ||z - sg(e)||^2
    entropy_loss: torch.Tensor  # (): per-position entropy - codebook-average entropy; zero when off
    usage_fraction: torch.Tensor  # (): fraction of the K codes used in this batch
    perplexity: torch.Tensor  # (): exp(entropy of this batch's code histogram)


def squared_distances(features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(N, d), (K, d) -> (N, K) squared euclidean distances ||f||^2 + ||e||^2 - 2 f.e."""
    squared_norms = features.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)  # (N, K)
    return torch.addmm(squared_norms, features, codes.t(), alpha=-2.0)


def histogram_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a histogram of code counts (K,); 0 for an empty histogram.

    Written without data-dependent branches so it never forces a GPU sync inside a training step."""
    total = counts.sum()
    probs = counts.float() / total.clamp_min(1)
    perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
    return torch.where(total > 0, perplexity, torch.zeros_like(perplexity))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _unit_rows(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B * h * w, d) l2-normalised fp32 rows in raster order."""
    rows = feature_map.float().permute(0, 2, 3, 1).reshape(-1, feature_map.shape[1])
    return F.normalize(rows, dim=-1)


def _random_unit_rows(rows: int, width: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, width), dim=-1)


class DualCodebookQuantizer(nn.Module):
    """Two codebooks (K, d_sem) and (K, d_pix) with one shared index; see the module docstring."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.mode = config.quantizer_mode
        self.branches: tuple[str, ...] = _BRANCHES_BY_MODE[self.mode]
        self.codebook_size = config.codebook_size
        self.branch_weights = {"sem": config.w_sem, "pix": config.w_pix}
        self.beta = config.beta
        self.codebook_update = config.codebook_update
        self.ema_decay = config.ema_decay
        self.dead_code_threshold = config.dead_code_threshold
        self.restart_every = config.restart_every
        self.entropy_loss_weight = config.entropy_loss_weight
        self.entropy_temperature = config.entropy_temperature
        self.bf16_search = config.training_code_search == "bf16"

        # With EMA updates the codebooks are state, not trained weights: no gradient, no optimizer.
        learned_by_gradient = config.codebook_update == "loss"
        widths = {"sem": config.d_sem, "pix": config.d_pix}
        for branch in ("sem", "pix"):
            codebook = None
            if branch in self.branches:
                codebook = nn.Parameter(
                    _random_unit_rows(self.codebook_size, widths[branch]), requires_grad=learned_by_gradient
                )
            self.register_parameter(f"codebook_{branch}", codebook)

        # The cluster-size EMA is shared by both codebooks (one index) and doubles as the usage signal
        # for dead-code restarts, so it exists in both update modes. The embedding-sum EMAs exist in
        # both modes too, so a checkpoint keeps its keys when its update mode is switched (e.g. to
        # "loss" for end-to-end tuning). Sums start at the initial codes so never-used codes keep them.
        self.register_buffer("ema_cluster_size", torch.zeros(self.codebook_size))  # (K,)
        for branch in self.branches:  # (K, d_b)
            self.register_buffer(f"ema_embed_sum_{branch}", self.codebook(branch).detach().clone())
        # Code counts since the last reset_usage(), for usage_fraction() and perplexity.
        self.register_buffer("usage_counts", torch.zeros(self.codebook_size, dtype=torch.long))  # (K,)
        self.register_buffer("num_training_steps", torch.zeros((), dtype=torch.long))
        self.preference_margin = config.code_preference_margin
        # (K,) how often the training images chose each code; read when preference_margin > 0. Older saved
        # tokenizers lack it and load with zeros (`DualCodebookTokenizer.from_pretrained`).
        self.register_buffer("code_preference", torch.zeros(self.codebook_size))

    def codebook(self, branch: str) -> nn.Parameter:
        return getattr(self, f"codebook_{branch}")

    # ------------------------------------------------------------------ quantization
    def forward(self, z_sem: torch.Tensor | None, z_pix: torch.Tensor | None) -> QuantizerOutput:
        """z_sem (B, d_sem, h, w) and z_pix (B, d_pix, h, w); the inactive branch of a mode may be None.

        In training mode with gradients enabled this also restarts dead codes (when due) and, with
        EMA updates, moves the codebooks; `usage_counts` is updated on every call.
        """
        inputs = {"sem": z_sem, "pix": z_pix}
        for branch in self.branches:
            if inputs[branch] is None:
                raise ValueError(f"quantizer mode {self.mode!r} needs z_{branch}")
        reference = inputs[self.branches[0]]
        batch, _, height, width = reference.shape
        updating = self.training and torch.is_grad_enabled()

        with torch.autocast(reference.device.type, enabled=False):
            features = {branch: _unit_rows(inputs[branch]) for branch in self.branches}  # (N, d_b) fp32
            if updating:
                self.num_training_steps += 1
                step = int(self.num_training_steps)
                # Step 1 too: every code is still unused then, so the codebooks start from real
                # features (a data-dependent init, like k-means init) instead of random directions.
                # Before assignment, so restarted codes are used by the batch they came from.
                if self.restart_every and (step == 1 or step % self.restart_every == 0):
                    self._restart_dead_codes(features)
            codes = {
                branch: F.normalize(self.codebook(branch).float(), dim=-1) for branch in self.branches
            }  # (K, d_b)
            # Training steps take the nearest code; encoding prefers common ones (code_preference_margin).
            indices = self.nearest_codes(
                features, codes, bf16=updating and self.bf16_search, margin=0.0 if updating else self.preference_margin
            )  # (N,)

            zero = reference.new_zeros((), dtype=torch.float32)
            codebook_loss, commitment_loss, quantized = zero, zero, {}
            for branch in self.branches:
                selected = codes[branch][indices]  # (N, d_b)
                commitment_loss = (
                    commitment_loss + (features[branch] - selected.detach()).pow(2).sum(-1).mean()
                )
                if self.codebook_update == "loss":
                    codebook_loss = (
                        codebook_loss + (features[branch].detach() - selected).pow(2).sum(-1).mean()
                    )
                straight_through = features[branch] + (selected - features[branch]).detach()  # (N, d_b)
                # contiguous(): a channels-last view would make every decoder conv and GroupNorm after
                # it channels-last too, which is several times slower on CPU.
                quantized[branch] = (
                    straight_through.view(batch, height, width, -1)
                    .permute(0, 3, 1, 2)
                    .contiguous()
                    .to(inputs[branch].dtype)
                )  # (B, d_b, h, w)
            entropy_loss = zero
            if self.entropy_loss_weight > 0 and self.training:
                entropy_loss = self.entropy_loss(features, codes)

            counts = torch.bincount(indices, minlength=self.codebook_size)  # (K,)
            if updating:
                self._update_ema(features, indices, counts)
            self.usage_counts += counts

        return QuantizerOutput(
            indices=indices.view(batch, height, width),
            quantized_sem=quantized.get("sem"),
            quantized_pix=quantized.get("pix"),
            vq_loss=codebook_loss + self.beta * commitment_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            entropy_loss=entropy_loss,
            usage_fraction=(counts > 0).float().mean(),
            perplexity=histogram_perplexity(counts),
        )

    def combined_distances(
        self, features: dict[str, torch.Tensor], codes: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """(N, K) sum over active branches of w_b * ||f_b - e_b||^2 (TokenFlow's shared-index distance)."""
        total = None
        for branch in self.branches:
            distance = self.branch_weights[branch] * squared_distances(features[branch], codes[branch])
            total = distance if total is None else total + distance
        return total

    @torch.no_grad()
    def nearest_codes(
        self, features: dict[str, torch.Tensor], codes: dict[str, torch.Tensor], bf16: bool = False,
        margin: float = 0.0,
    ) -> torch.Tensor:
        """(N,) int64 index minimising `combined_distances`, computed a chunk of positions at a time.

        Rows of `features` and `codes` are unit vectors (the quantizer's cosine geometry), so
        w_b * ||f_b - e_b||^2 = w_b * (2 - 2 f_b . e_b) and the nearest code is the one with the largest
        score sum_b w_b f_b . e_b: one matmul of the weighted, concatenated features with the concatenated
        codes, and one pass over the (N, K) scores instead of the distances' several (at K = 16384 the
        distances took most of a CPU training step). `bf16`: the scores in bf16 (training steps with
        `training_code_search="bf16"`); argmax reads them as fp32, whose argmax kernel is the fast one.
        `margin` > 0: among the codes within it of the nearest (a distance margin, so half of it on the
        score), the one with the largest `code_preference`; equal preferences go to the nearer code.
        """
        weighted = torch.cat([self.branch_weights[b] * features[b] for b in self.branches], dim=1)  # (N, d)
        stacked = torch.cat([codes[b] for b in self.branches], dim=1)  # (K, d)
        if bf16:
            weighted, stacked = weighted.bfloat16(), stacked.bfloat16()
        elements = _DISTANCE_CHUNK_ELEMENTS
        if weighted.device.type == "cpu":
            elements = min(elements, _CPU_DISTANCE_CHUNK_ELEMENTS)
        chunk = max(1, elements // self.codebook_size)
        chosen = []
        for start in range(0, weighted.shape[0], chunk):
            scores = torch.mm(weighted[start : start + chunk], stacked.t()).float()  # (n, K)
            if margin > 0:
                near = scores >= scores.max(1, keepdim=True).values - margin / 2
                ranked = torch.where(near, self.code_preference[None], -1.0)
                best = near & (ranked == ranked.max(1, keepdim=True).values)
                scores = torch.where(best, scores, -torch.inf)
            chosen.append(scores.argmax(1))
        return torch.cat(chosen)

    @torch.no_grad()
    def set_code_preference(self, counts: torch.Tensor) -> None:
        """Store (K,) code counts (of the training images' codes) for `nearest_codes`' preference."""
        if counts.shape != (self.codebook_size,):
            raise ValueError(f"expected {self.codebook_size} code counts, got shape {tuple(counts.shape)}")
        self.code_preference.copy_(counts.float())

    def entropy_loss(self, features: dict[str, torch.Tensor], codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-position entropy of softmax(-distance / T) minus the entropy of its codebook average."""
        log_probs = F.log_softmax(
            -self.combined_distances(features, codes) / self.entropy_temperature, dim=-1
        )
        probs = log_probs.exp()  # (N, K)
        per_position_entropy = -(probs * log_probs).sum(-1).mean()
        average_probs = probs.mean(0)  # (K,)
        codebook_entropy = -(average_probs * torch.log(average_probs.clamp_min(1e-10))).sum()
        return per_position_entropy - codebook_entropy

    # ------------------------------------------------------------------ codebook state
    @torch.no_grad()
    def _update_ema(
        self, features: dict[str, torch.Tensor], indices: torch.Tensor, counts: torch.Tensor
    ) -> None:
        counts = counts.float()  # (K,)
        sums = {  # (K, d_b): sum of the features assigned to each code
            branch: features[branch]
            .new_zeros(self.codebook_size, features[branch].shape[1])
            .index_add_(0, indices, features[branch])
            for branch in self.branches
        }
        if _distributed():  # every rank applies the same update from the global statistics
            torch.distributed.all_reduce(counts)
            for total in sums.values():
                torch.distributed.all_reduce(total)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        if self.codebook_update != "ema":
            return
        cluster_size = self.ema_cluster_size.float()
        total_count = cluster_size.sum()
        smoothed = (
            (cluster_size + _LAPLACE_EPSILON)
            / (total_count + self.codebook_size * _LAPLACE_EPSILON)
            * total_count
        )
        for branch in self.branches:
            embed_sum = getattr(self, f"ema_embed_sum_{branch}")
            embed_sum.mul_(decay).add_(sums[branch], alpha=1 - decay)
            means = embed_sum.float() / smoothed.clamp_min(1e-12).unsqueeze(1)  # (K, d_b)
            norms = means.norm(dim=-1, keepdim=True)
            codebook = self.codebook(branch)
            # Back onto the unit sphere; a row whose running sum has underflowed keeps its direction.
            renormalised = torch.where(norms > 1e-20, means / norms.clamp_min(1e-20), codebook.data.float())
            codebook.data.copy_(renormalised)

    @torch.no_grad()
    def restart_dead_codes(self, z_sem: torch.Tensor | None = None, z_pix: torch.Tensor | None = None) -> int:
        """Restart codes with EMA usage below the threshold from these features (B, d_b, h, w).

        Returns the number of restarted codes. `forward` calls this at training step 1 and every
        `restart_every` steps.
        """
        inputs = {"sem": z_sem, "pix": z_pix}
        return self._restart_dead_codes({branch: _unit_rows(inputs[branch]) for branch in self.branches})

    @torch.no_grad()
    def _restart_dead_codes(self, features: dict[str, torch.Tensor]) -> int:
        dead = (self.ema_cluster_size < self.dead_code_threshold).nonzero().squeeze(1)  # (D,)
        num_dead = dead.numel()
        if num_dead == 0:
            return 0
        num_positions = features[self.branches[0]].shape[0]
        device = dead.device
        if num_positions >= num_dead:
            positions = torch.randperm(num_positions, device=device)[:num_dead]
        else:
            positions = torch.randint(num_positions, (num_dead,), device=device)
        # A restarted code starts exactly at the threshold: if no feature is assigned to it before the
        # next check, its usage has decayed below the threshold and it is restarted again. Its EMA
        # sum is its new row times that count, so the EMA mean is the new row.
        restart_count = self.dead_code_threshold
        restarted_state = [self.ema_cluster_size]
        for branch in self.branches:
            chosen = features[branch][positions]  # (D, d_b): the SAME positions for both codebooks
            self.codebook(branch).data[dead] = chosen.to(self.codebook(branch).dtype)
            embed_sum = getattr(self, f"ema_embed_sum_{branch}")
            embed_sum[dead] = (chosen * restart_count).to(embed_sum.dtype)
            restarted_state += [self.codebook(branch).data, embed_sum]
        self.ema_cluster_size[dead] = restart_count
        if _distributed():  # features differ per rank; rank 0's choice wins everywhere
            for tensor in restarted_state:
                torch.distributed.broadcast(tensor, src=0)
        return num_dead

    # ------------------------------------------------------------------ lookup and statistics
    def lookup(self, indices: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Code indices (...) -> unit-norm codebook rows ((..., d_sem), (..., d_pix)); None for an
        inactive branch. Differentiable with respect to the codebooks."""
        rows = []
        for codebook in (self.codebook_sem, self.codebook_pix):
            rows.append(None if codebook is None else F.normalize(codebook[indices], dim=-1))
        return rows[0], rows[1]

    def usage_fraction(self) -> float:
        """Fraction of the K codes used at least once since the last `reset_usage()`."""
        return (self.usage_counts > 0).float().mean().item()

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code histogram since the last `reset_usage()` (K = uniform use)."""
        return histogram_perplexity(self.usage_counts).item()

    def reset_usage(self) -> None:
        self.usage_counts.zero_()


__all__ = ["DualCodebookQuantizer", "QuantizerOutput", "histogram_perplexity", "squared_distances"]
