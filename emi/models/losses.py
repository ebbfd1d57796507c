"""The training objectives: Stage I's contrastive loss and Stage II's regression loss.

Stage I contrastive loss: symmetric InfoNCE with annotation-confidence weights (paper Eq. 2), with the negatives
taken from the global batch across ranks (modelled on OpenCLIP's `ClipLoss` and `gather_features`).

Eq. 2 weights each sample's term by w_i, "determined by VA value standard deviations". Our reading:

    c_i = 1 / (1 + sigma_i / s)        (s = VA_STD_SCALE = 0.1; c_i = 1 where the sample has no VA spread)
    w_i = c_i / mean_j(c_j)            (mean over the global batch, so the weights average 1)
    L   = 1/N * sum_i w_i * (CE(a_i -> b) + CE(b_i -> a)) / 2

sigma_i is the standard deviation of sample i's valence/arousal annotations (across annotators or across the
frames of a clip; the data provides it as `va_std`, one value or a (valence, arousal) pair per sample). A sample
whose annotators disagree, or whose affect swings within the clip, has a less reliable prompt and pulls less.
With sigma_i = s the confidence halves. The mean-normalisation keeps the loss on the scale of plain InfoNCE, so
learning rates carry over; with all sigma equal the loss is exactly plain symmetric InfoNCE.

Stage II regression loss (`RegressionLoss`): a weighted mix of terms over the GLOBAL batch (every rank's rows,
all-gathered with gradients), per emotion k over the samples that have label k (mask m):

    mse     = sum m (p - y)^2 / sum m
    pearson = 1 - mean_k rho_k,   rho_k = cov_k(p, y) / sqrt(var_k(p) var_k(y) + eps)
    ccc     = 1 - mean_k ccc_k,   ccc_k = 2 cov_k(p, y) / (var_k(p) + var_k(y) + (mu_k(p) - mu_k(y))^2 + eps)

with population moments over the labelled samples; an emotion with fewer than 2 labelled samples in the global
batch is left out of the means. Pearson and CCC are properties of a whole set, not sums over samples: computed per
rank they would be a different (noisier) objective than the same batch on one process, hence the gather.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

VA_STD_SCALE = 0.1  # VA in [-1, 1]: a spread of 5% of the range already halves a sample's pull


def va_confidence_weights(va_std: Tensor | None, batch_size: int, scale: float = VA_STD_SCALE) -> Tensor:
    """Confidences c_i = 1 / (1 + sigma_i / scale) in (0, 1], shape [batch_size], float32.

    `va_std` is [B] (one sigma per sample) or [B, 2] (valence and arousal sigma, averaged). None, or NaN for a
    sample (labels without VA), gives confidence 1. These are not yet normalised: `ContrastiveLoss` rescales
    them to mean 1 over the global batch.
    """
    if va_std is None:
        return torch.ones(batch_size)
    if va_std.dim() == 2 and va_std.shape[1] == 2:
        va_std = va_std.mean(dim=1)  # NaN in either component makes the sample "no VA": confidence 1
    if va_std.dim() != 1 or va_std.shape[0] != batch_size:
        raise ValueError(f"va_std: expected shape [{batch_size}] or [{batch_size}, 2], got {list(va_std.shape)}")
    sigma = va_std.float()
    if (sigma < 0).any() or torch.isinf(sigma).any():
        raise ValueError(f"va_std: standard deviations must be finite and >= 0, got {sigma.tolist()}")
    return 1.0 / (1.0 + torch.nan_to_num(sigma, nan=0.0) / scale)


def gather_features(
    features_a: Tensor, features_b: Tensor, gather_with_grad: bool, rank: int, world_size: int
) -> tuple[Tensor, Tensor]:
    """Concatenate every rank's features in rank order, keeping gradients.

    gather_with_grad: an autograd all-gather, whose backward sums the gradients of all ranks into each slot.
    Otherwise a plain all-gather, with this rank's own tensor put back in its slot so that at least the
    gradient through the local rows and columns reaches the encoders (OpenCLIP's cheaper approximation).
    """
    if gather_with_grad:
        return torch.cat(dist_nn.all_gather(features_a), dim=0), torch.cat(dist_nn.all_gather(features_b), dim=0)
    gathered_a = [torch.empty_like(features_a) for _ in range(world_size)]
    gathered_b = [torch.empty_like(features_b) for _ in range(world_size)]
    dist.all_gather(gathered_a, features_a.contiguous())
    dist.all_gather(gathered_b, features_b.contiguous())
    gathered_a[rank] = features_a
    gathered_b[rank] = features_b
    return torch.cat(gathered_a, dim=0), torch.cat(gathered_b, dim=0)


class ContrastiveLoss(nn.Module):
    """Weighted symmetric InfoNCE over the global batch (see the module docstring for the formula).

    Every rank must hold the same number of samples (all-gather needs equal shapes): drop the last partial batch.
    local_loss=False: every rank computes the full N x N logits and the same global loss L.
    local_loss=True: rank r computes only its n rows against all N columns (targets offset by r * n), giving
    L_r with mean_r L_r = L; memory per rank is n x N instead of N x N.

    Gradient identities (tested), with g the single-process gradient of L for the same global batch:
    - gather_with_grad=True: rank r's input gradient is world_size * g[rank r rows] for either local_loss, so
      DDP's gradient averaging yields exactly dL/dparams. The logit_scale gradient averaged over ranks is dL/ds.
    - gather_with_grad=False, local_loss=False: rank r's input gradient is g[rank r rows] (its slot is the only
      path to its inputs), so DDP's average is dL/dparams / world_size; the logit_scale gradient is dL/ds.
    - gather_with_grad=False, local_loss=True: rank r's input gradient is that of L_r with the other ranks'
      features held constant (the negatives of other ranks send no gradient back): an approximation.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(
        self, features_a: Tensor, features_b: Tensor, logit_scale: Tensor | float, weights: Tensor | None = None
    ) -> Tensor:
        """Loss for paired rows of `features_a` and `features_b` ([n, D], L2-normalised by the caller, as
        OpenCLIP's encoders do: the loss uses them as given).

        logit_scale is the multiplier 1/tau (e.g. 1/0.07), not its log. weights: this rank's confidences [n]
        (e.g. from `va_confidence_weights`), rescaled here to mean 1 over the global batch; None = all equal.
        """
        if features_a.dim() != 2 or features_a.shape != features_b.shape:
            raise ValueError(
                f"ContrastiveLoss: features must be two [n, D] tensors of one shape, got "
                f"{list(features_a.shape)} and {list(features_b.shape)}"
            )
        local_batch = features_a.shape[0]
        if weights is None:
            weights = torch.ones(local_batch, device=features_a.device)
        elif weights.shape != (local_batch,):
            raise ValueError(f"ContrastiveLoss: weights must have shape [{local_batch}], got {list(weights.shape)}")
        # at least float32: bf16 logits (DeepSpeed bf16) lose the small differences between negatives
        compute_dtype = torch.promote_types(features_a.dtype, torch.float32)
        weights = weights.to(device=features_a.device, dtype=compute_dtype)

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        if distributed:
            all_a, all_b = gather_features(features_a, features_b, self.gather_with_grad, rank, world_size)
            gathered_weights = [torch.empty_like(weights) for _ in range(world_size)]
            dist.all_gather(gathered_weights, weights)
            all_weights = torch.cat(gathered_weights)
        else:
            all_a, all_b, all_weights = features_a, features_b, weights
        all_weights = all_weights / all_weights.mean()

        if self.local_loss:
            logits_a = logit_scale * features_a @ all_b.T
            logits_b = logit_scale * features_b @ all_a.T
            offset = rank * local_batch
            targets = torch.arange(offset, offset + local_batch, device=features_a.device)
            sample_weights = all_weights[offset : offset + local_batch]
        else:
            logits_a = logit_scale * all_a @ all_b.T
            logits_b = logits_a.T
            targets = torch.arange(all_a.shape[0], device=features_a.device)
            sample_weights = all_weights
        per_sample = (
            F.cross_entropy(logits_a.to(compute_dtype), targets, reduction="none")
            + F.cross_entropy(logits_b.to(compute_dtype), targets, reduction="none")
        ) / 2
        return (sample_weights * per_sample).mean()


# ---------------------------------------------------------------------------------------------------------------
# Stage II: regression of the intensities
# ---------------------------------------------------------------------------------------------------------------
REGRESSION_TERMS = ("mse", "pearson", "ccc")
MOMENT_EPS = 1e-8  # keeps rho and ccc (and their gradients) finite when a column's predictions are constant


def regression_terms(pred: Tensor, labels: Tensor, label_mask: Tensor) -> dict[str, Tensor]:
    """The terms of the module docstring for [N, K] predictions and labels (NaN where missing) and the [N, K]
    mask of present labels, on the rows given: {"mse", "pearson", "ccc"}, float32 or wider."""
    pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
    mask = label_mask.to(pred.dtype)
    target = torch.nan_to_num(labels.to(pred.dtype)) * mask
    counts = mask.sum(0)
    columns = counts >= 2
    per_column = counts.clamp(min=1)
    mean_pred, mean_target = (pred * mask).sum(0) / per_column, target.sum(0) / per_column
    dev_pred, dev_target = (pred - mean_pred) * mask, (target - mean_target) * mask
    cov = (dev_pred * dev_target).sum(0) / per_column
    var_pred, var_target = (dev_pred**2).sum(0) / per_column, (dev_target**2).sum(0) / per_column
    rho = cov / torch.sqrt(var_pred * var_target + MOMENT_EPS)
    ccc = 2 * cov / (var_pred + var_target + (mean_pred - mean_target) ** 2 + MOMENT_EPS)
    used = columns.to(pred.dtype)
    return {
        "mse": ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1),
        "pearson": 1 - (rho * used).sum() / used.sum().clamp(min=1),
        "ccc": 1 - (ccc * used).sum() / used.sum().clamp(min=1),
    }


class RegressionLoss(nn.Module):
    """sum_t weights[t] * term_t (terms: `regression_terms`) over the global batch.

    Every rank must hold the same number of rows (the loaders guarantee it). The predictions are all-gathered with
    gradients and every rank computes the same global loss L, so rank r's input gradient is world_size * dL/dp_r
    and DDP's (or DeepSpeed's) gradient averaging yields exactly dL/dparams, as on one process with the whole batch.
    """

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(REGRESSION_TERMS))
        if unknown or not any(weight > 0 for weight in weights.values()) or min(weights.values()) < 0:
            raise ValueError(
                f"loss weights must be >= 0 for terms among {REGRESSION_TERMS}, at least one > 0; got {weights}"
            )
        self.weights = {name: float(weight) for name, weight in weights.items() if weight > 0}

    def forward(self, pred: Tensor, labels: Tensor, label_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, every weighted term's value) for this rank's rows [n, K]."""
        if pred.dim() != 2 or pred.shape != labels.shape or pred.shape != label_mask.shape:
            raise ValueError(
                f"RegressionLoss: pred, labels and label_mask must be [n, K] of one shape, got "
                f"{list(pred.shape)}, {list(labels.shape)}, {list(label_mask.shape)}"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            pred = torch.cat(dist_nn.all_gather(pred.contiguous()), dim=0)
            labels = torch.cat(dist_nn.all_gather(labels.contiguous()), dim=0)
            # gloo gathers no bools
            label_mask = torch.cat(dist_nn.all_gather(label_mask.to(torch.uint8).contiguous()), dim=0).bool()
        terms = regression_terms(pred, labels, label_mask)
        loss = sum(weight * terms[name] for name, weight in self.weights.items())
        return loss, {name: terms[name].detach() for name in self.weights}
