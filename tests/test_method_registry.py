"""The method registry and the backends: a method is one module; no plan kind can be skipped silently."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge import fused, parse_recipe, run_recipe
from hubmerge.backends import FusedBackend, TorchBackend
from hubmerge.display import parameter_rows
from hubmerge.methods import METHODS
from hubmerge.methods.registry import MergeSpec, PieceVector
from hubmerge.planning import plan_summary, prepare
from hubmerge.statistics import Tally

NEW_METHOD = '''
"""Negated Task Arithmetic, a method defined by this file alone: θ0 − α·Σ τ_t."""

import torch
from pydantic import Field

from hubmerge.methods.registry import Citation, MergeSpec, Method, Params, Piece, PieceVector, register
from hubmerge.methods.task_arithmetic import sum_in_task_order


class NegatedParams(Params):
    scaling: float = Field(0.5, description="α, multiplies the negated sum")


def negated(piece: Piece) -> torch.Tensor:
    return sum_in_task_order(piece.taus).neg_()


register(
    Method(
        "negated_sum",
        NegatedParams,
        "merged",
        "θ0 − α·Σ τ_t",
        "the base minus the scaled sum of the task vectors",
        plan=lambda p, names: MergeSpec("negated_sum", "merged", PieceVector(negated), scaling=p.scaling),
        searchable=("scaling",),
        citation=Citation("A. Author. *Negation.* 2026.", "@misc{negation}"),
        composable=True,
    )
)
'''


@pytest.fixture
def new_method(tmp_path):
    path = tmp_path / "negated_sum.py"
    path.write_text(NEW_METHOD)
    spec = importlib.util.spec_from_file_location("negated_sum_method", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield METHODS["negated_sum"]
    del METHODS["negated_sum"], sys.modules[spec.name]


def models(tmp_path, t: int = 3):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(40, 24, generator=gen), "b": torch.randn(24, generator=gen)}
    save_file(base, tmp_path / "base.safetensors")
    thetas = []
    for i in range(t):
        thetas.append({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
        save_file(thetas[-1], tmp_path / f"m{i}.safetensors")
    return base, thetas


def recipe(tmp_path, method: str, parameters: dict | None = None, t: int = 3):
    return parse_recipe(
        {
            "version": 1,
            "base": str(tmp_path / "base.safetensors"),
            "models": [{"source": str(tmp_path / f"m{i}.safetensors"), "name": f"m{i}"} for i in range(t)],
            "method": method,
            "parameters": parameters or {},
        }
    )


def test_a_method_defined_in_one_file_runs_end_to_end_and_is_listed_everywhere(new_method, tmp_path):
    base, thetas = models(tmp_path)
    result = run_recipe(recipe(tmp_path, "negated_sum", {"scaling": 0.25}), output=tmp_path / "out")
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for key in base:
        expected = base[key] - 0.25 * sum(theta[key] - base[key] for theta in thetas)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
    assert [row[0] for row in parameter_rows(new_method)] == ["scaling"]
    assert "@misc{negation}" in (tmp_path / "out" / "README.md").read_text()
    assert result.record["method"] == "negated_sum"
    # composes with TALL masks and Consensus as τ_MTL
    run_recipe(recipe(tmp_path, "consensus", {"merge": "negated_sum", "k": 1}), output=tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").is_file()


@dataclass(frozen=True)
class UnknownVector:
    """A vector kind no backend knows."""


def test_fused_backend_cannot_skip_a_vector_kind_it_does_not_know():
    if fused.library() is None:
        pytest.skip("the fused kernels do not compile here")
    spec = MergeSpec("x", "merged", UnknownVector())  # type: ignore[arg-type]
    base, thetas = torch.zeros(16), [torch.ones(16), torch.ones(16)]
    with pytest.raises(AssertionError, match=r"unreachable|UnknownVector"):
        FusedBackend(spec, Tally(spec, 2)).computes(base, thetas)


def test_torch_backend_cannot_skip_a_vector_kind_it_does_not_know(tmp_path):
    models(tmp_path)
    job = prepare(recipe(tmp_path, "task_arithmetic"))
    job.spec = MergeSpec("x", "merged", UnknownVector())  # type: ignore[arg-type]
    backend = TorchBackend(job, Tally(job.spec, 3), stream=None)  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match=r"unreachable|UnknownVector"):
        backend.compute("w", 0, torch.zeros(8), [torch.ones(8)] * 3)
    job.close()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_declares_what_the_cli_search_and_card_read(name):
    method = METHODS[name]
    assert method.summary and method.description
    assert set(method.searchable) <= {"scaling", "lambda", "k"}
    if "scaling" in method.searchable:
        assert "scaling" in method.params.model_fields
    rows = parameter_rows(method)
    assert all(description for _, _, description in rows)


def test_piece_vector_methods_are_computed_by_torch_and_planned_with_their_passes(tmp_path):
    models(tmp_path)
    job = prepare(recipe(tmp_path, "breadcrumbs", {"density": 0.5, "gamma": 0.1}))
    assert isinstance(job.spec.vector, PieceVector)
    assert FusedBackend(job.spec, Tally(job.spec, 3)).computes(torch.zeros(8), [torch.ones(8)] * 3) is False
    passes = plan_summary(job)["passes"]
    assert passes == ["per-tensor thresholds (1 of 2)", "per-tensor thresholds (2 of 2)", "merge and write"]
    job.close()


def test_task_count_limits_are_recipe_errors(tmp_path):
    from hubmerge.errors import HubmergeError

    models(tmp_path, t=3)
    if "slerp" not in METHODS:
        pytest.skip("no method with a task-count limit registered")
    with pytest.raises(HubmergeError, match="slerp takes exactly 1 fine-tuned model"):
        recipe(tmp_path, "slerp", {}, t=3)
