"""How a piece is computed: by the methods' tensor functions (torch, any device) or by the fused CPU kernels.

`TorchBackend` computes every plan: span by span on the CPU (cache-sized float32 temporaries), whole pieces
on a GPU and for a method's own piece functions (`PieceVector`, which may need whole rows). `FusedBackend`
computes a whole piece in one loop (`hubmerge.fused`) for the plans it `handles`; which those are is an
exhaustive `match` over the vector and mask kinds, so a new kind is a type error (`assert_never`) until the
backend says whether it computes it, never a silently skipped piece.
"""

from __future__ import annotations

from typing import assert_never

import torch

from hubmerge import fused
from hubmerge.methods import MergeSpec
from hubmerge.methods.registry import NoVector, Piece, PieceVector, SumVector, TiesVector
from hubmerge.methods.tall import consensus_mask, mask_count, tall_masks
from hubmerge.methods.task_arithmetic import sum_in_task_order, task_vectors
from hubmerge.methods.ties import disjoint_merge, elect_sign, resolve_zero_signs, sign_count, trim
from hubmerge.methods.topk import topk_mask
from hubmerge.planning import MergeJob
from hubmerge.statistics import Tally
from hubmerge.streaming import Stream


class TorchBackend:
    """The methods' tensor functions, on any device."""

    def __init__(self, job: MergeJob, tally: Tally, stream: Stream):
        self.job = job
        self.spec = job.spec
        self.tally = tally
        self.stream = stream

    @property
    def whole_pieces(self) -> bool:
        """Whether a piece is computed whole rather than span by span: a method's own piece functions see
        whole rows."""
        return isinstance(self.spec.vector, PieceVector)

    def spans(self, base: torch.Tensor, thetas: list[torch.Tensor]):
        return self.stream.spans(base, thetas, whole=self.whole_pieces)

    def compute(
        self, key: str, start: int, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
        """(τ_MTL — consensus-filtered for consensus, task masks, task vectors) of the span that starts at
        entry `start` of tensor `key`, statistics recorded."""
        spec = self.spec
        taus = task_vectors(base, thetas)
        tau_mtl = self._vector(key, start, base, thetas, taus)
        masks: list[torch.Tensor] = []
        match spec.masks:
            case "tall":
                masks = tall_masks(base, thetas, tau_mtl, spec.lambdas, taus)
            case "magnitude":
                thresholds = self.tally.thresholds_for(key)
                masks = [topk_mask(tau, thr) for tau, thr in zip(taus, thresholds, strict=True)]
            case None:
                pass
            case _:
                assert_never(spec.masks)
        if masks:
            count = mask_count(masks)
            self.tally.record_masks(masks, count, taus)
            if spec.consensus_k is not None:
                keep = consensus_mask(count, spec.consensus_k)
                self.tally.stats.consensus_kept += int(torch.count_nonzero(keep))
                tau_mtl = tau_mtl * keep
        return tau_mtl, masks, taus

    def _vector(
        self,
        key: str,
        start: int,
        base: torch.Tensor,
        thetas: list[torch.Tensor],
        taus: list[torch.Tensor],
    ) -> torch.Tensor | None:
        vector = self.spec.vector
        match vector:
            case SumVector():
                return sum_in_task_order(taus)
            case TiesVector():
                return self._ties_vector(key, taus)
            case NoVector():
                return None
            case PieceVector():
                return vector.compute(self.piece(key, start, base, thetas, taus))
            case _:
                assert_never(vector)

    def piece(
        self,
        key: str,
        start: int,
        base: torch.Tensor,
        thetas: list[torch.Tensor],
        taus: list[torch.Tensor],
    ) -> Piece:
        """What a method's piece functions see of a piece."""
        return Piece(
            key=key,
            shape=tuple(self.job.base.infos[key].shape),
            start=start,
            base=base,
            thetas=thetas,
            taus=taus,
            thresholds=self.tally.tensor_thresholds_for(key),
            statistics=self._tensor_sums(key, base.device),
        )

    def _tensor_sums(self, key: str, device: torch.device) -> torch.Tensor | None:
        """The method's per-tensor sums on the compute device (they are gathered on the CPU)."""
        sums = self.tally.tensor_sums.get(key)
        return None if sums is None else sums.to(device)

    def _ties_vector(self, key: str, taus: list[torch.Tensor]) -> torch.Tensor:
        trimmed = trim(taus, self.tally.thresholds_for(key))
        elected = elect_sign(trimmed)
        if self.tally.counting_signs:
            self.tally.sign_count += sign_count(elected)
        return disjoint_merge(trimmed, resolve_zero_signs(elected, self.tally.majority), self.spec.ties.merge)

    def sign_count(self, key: str, base: torch.Tensor, thetas: list[torch.Tensor]) -> int:
        """Σ of the elected TIES signs of one piece."""
        thresholds = self.tally.thresholds_for(key)
        return sum(
            sign_count(elect_sign(trim(task_vectors(base_span, theta_spans), thresholds)))
            for _, base_span, theta_spans in self.spans(base, thetas)
        )

    def tensor_sums(
        self, key: str, start: int, base: torch.Tensor, thetas: list[torch.Tensor]
    ) -> torch.Tensor:
        """The method's per-tensor statistics of one piece (float64)."""
        statistics = self.spec.tensor_statistics
        assert statistics is not None
        piece = self.piece(key, start, base, thetas, task_vectors(base, thetas))
        return statistics(piece).to(torch.float64)


class FusedBackend:
    """The fused CPU kernels: a whole piece in one loop, where they compile and the inputs' dtypes allow."""

    def __init__(self, spec: MergeSpec, tally: Tally):
        self.spec = spec
        self.tally = tally

    @staticmethod
    def reads(base: torch.Tensor, thetas: list[torch.Tensor]) -> bool:
        """Whether the kernels take these inputs (their dtypes and layout)."""
        return fused.supports(base, *thetas)

    def computes(self, base: torch.Tensor, thetas: list[torch.Tensor]) -> bool:
        """Whether `output_piece` computes this plan for these inputs."""
        if not self.reads(base, thetas):
            return False
        vector = self.spec.vector
        match vector:
            case SumVector() | TiesVector():
                pass
            case NoVector():  # each task's own kept values: the torch functions
                return False
            case PieceVector():  # a method's own tensor functions have no kernel
                return False
            case _:
                assert_never(vector)
        match self.spec.masks:
            case None:
                return True
            case "tall":
                return len(thetas) <= fused.MAX_TALL_TASKS
            case "magnitude":
                return False
            case _:
                assert_never(self.spec.masks)

    def output_piece(
        self,
        key: str,
        base: torch.Tensor,
        thetas: list[torch.Tensor],
        out: torch.Tensor,
        scaling: float | None,
        masks: torch.Tensor | None,
    ) -> None:
        """What `TorchBackend.compute` gives for a whole piece: τ_MTL (θ0 + α·τ_MTL with `scaling`) into `out`
        (float32), the TALL masks into `masks` ([T, n] bool) if given, statistics recorded. Only for plans
        that `computes` accepts."""
        spec, tally = self.spec, self.tally
        if spec.masks is None and isinstance(spec.vector, SumVector):
            fused.task_arithmetic(base, thetas, out, scaling)
            return
        tau_mtl = None
        if spec.ties is not None:
            signs = fused.ties(
                base,
                thetas,
                tally.thresholds_for(key),
                tally.majority,
                spec.ties.merge,
                out,
                scaling if spec.masks is None else None,
            )
            if tally.counting_signs:
                tally.sign_count += signs
            tau_mtl = out
        if spec.masks == "tall":
            counts = fused.tall(base, thetas, spec.lambdas, tau_mtl, spec.consensus_k, masks, out, scaling)
            t = len(thetas)
            inactive, active, kept = counts[: t + 1], counts[t + 1 : 2 * t + 2], counts[2 * t + 2 : 3 * t + 2]
            tally.add_mask_counts(inactive + active, active, [int(k) for k in kept])
            if spec.consensus_k is not None:
                tally.stats.consensus_kept += int(counts[-1])

    def sign_count(self, key: str, base: torch.Tensor, thetas: list[torch.Tensor]) -> int:
        return fused.ties(base, thetas, self.tally.thresholds_for(key), majority=0, merge=None)
