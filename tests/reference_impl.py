"""A straightforward whole-model implementation of every method, written from docs/algorithms semantics
without any hubmerge code: the flattened model in memory, `kthvalue` for thresholds, stacked sums.

The streaming engine must produce the same bits.
"""

from __future__ import annotations

import torch


def flatten(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].float().reshape(-1) for k in keys])


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[offset : offset + n].reshape(like[k].shape)
        offset += n
    return out


def topk_keep(values: torch.Tensor, density: float) -> torch.Tensor:
    """The reference's `topk_values_mask` on one row: >= the k-th smallest |v|, k = d − int(d·p)."""
    d = values.numel()
    k = d - int(d * density)
    if k == 0:
        return torch.ones_like(values, dtype=torch.bool)
    return values.abs() >= values.abs().kthvalue(k).values


def per_tensor_keep(values: torch.Tensor, sizes: list[int], density: float) -> torch.Tensor:
    return torch.cat([topk_keep(part, density) for part in values.split(sizes)])


def ties_vector(taus: torch.Tensor, keep: torch.Tensor, merge: str) -> torch.Tensor:
    trimmed = taus * keep
    signs = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(signs.sum())
    signs[signs == 0] = majority
    selected = trimmed * torch.where(signs.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    if merge == "mean":
        return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    if merge == "sum":
        return selected.sum(dim=0)
    return selected.abs().max(dim=0)[0] * signs


def reference_outputs(
    base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], method: str, params: dict
) -> dict:
    """{"vector": τ (merged methods: the scaled merged vector is θ0 + α·this), "masks": [...], "scaling": α}."""
    keys = sorted(k for k, v in base.items() if v.is_floating_point())
    sizes = [base[k].numel() for k in keys]
    theta0 = flatten(base, keys)
    thetas = torch.stack([flatten(m, keys) for m in models])
    taus = thetas - theta0
    t = len(models)

    def keep_of(density: float, trim: str = "global") -> torch.Tensor:
        rows = [
            topk_keep(tau, density) if trim == "global" else per_tensor_keep(tau, sizes, density)
            for tau in taus
        ]
        return torch.stack(rows)

    def tau_mtl_of(p: dict) -> torch.Tensor:
        if p.get("merge", "task_arithmetic") == "ties":
            ties = {"density": 0.2, "merge": "sum", "trim": "global", **p.get("ties", {})}
            return ties_vector(taus, keep_of(ties["density"], ties["trim"]), ties["merge"])
        return taus.sum(dim=0)

    def tall_masks(p: dict, tau_mtl: torch.Tensor) -> list[torch.Tensor]:
        lam = p.get("lambda", 0.4)
        lams = [lam] * t if not isinstance(lam, dict) else list(lam.values())
        multi = theta0 + tau_mtl
        return [(theta0 - thetas[i]).abs() > (multi - thetas[i]).abs() * lams[i] for i in range(t)]

    out: dict = {"keys": keys, "theta0": theta0, "taus": taus, "scaling": 1.0, "masks": None}
    if method in ("task_arithmetic", "weight_average"):
        out["vector"] = taus.sum(dim=0)
        out["scaling"] = params.get("scaling", 1.0) if method == "task_arithmetic" else 1.0 / t
    elif method == "ties":
        p = {"density": 0.2, "merge": "mean", "trim": "global", "scaling": 1.0, **params}
        out["vector"] = ties_vector(taus, keep_of(p["density"], p["trim"]), p["merge"])
        out["scaling"] = p["scaling"]
    elif method in ("tall_masks", "consensus"):
        tau_mtl = tau_mtl_of(params)
        masks = tall_masks(params, tau_mtl)
        out["masks"] = masks
        if method == "consensus":
            count = torch.stack(masks).sum(dim=0)
            out["vector"] = tau_mtl * (count >= params.get("k", 2))
            out["scaling"] = params.get("scaling", 1.0)
        else:
            out["vector"] = tau_mtl
    else:
        masks = list(keep_of(params.get("density", 0.1)))
        out["masks"] = masks
        out["vector"] = taus.sum(dim=0) if method == "magnitude_masking" else None
    return out
