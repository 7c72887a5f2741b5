"""LoRA merging in ΔW space: exactness, refusal of bad adapters, robustness (SPEC §5)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from mloc_dagster.core.adapters.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, InvalidAdapter
from mloc_dagster.core.adapters.lora import (
    Adapter,
    adapter_sha256,
    delta_weights,
    load_adapter,
    load_adapters,
    save_adapter,
)
from mloc_dagster.core.merging.merge import merge_adapters

R, ALPHA = 4, 8
SHAPES = {"enc": (16, 8), "out": (4, 16)}  # module -> (out_features, in_features)


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(8, 16)
        self.act = torch.nn.Tanh()
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.enc(x)))


@pytest.fixture(scope="module")
def base() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def peft_adapter(base: Tiny, out_dir: Path, seed: int, **lora_kw: object) -> torch.nn.Module:
    """A real peft adapter with non-zero A and B, saved with peft's own save_pretrained."""
    torch.manual_seed(seed)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["enc", "out"], init_lora_weights=False, **lora_kw)
    model = get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(str(out_dir))
    # peft names this test module as the model's library (auto_mapping); a node's adapter may only
    # name mloc_dagster's or transformers' (core/adapters/format.py), so the test model's says none.
    config_file = out_dir / ADAPTER_CONFIG
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"auto_mapping": None}))
    return model


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, base: Tiny) -> Path:
    d = tmp_path_factory.mktemp("template") / "adapter"
    peft_adapter(base, d, seed=1)
    return d


def write_adapter(
    root: Path, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], template: Path, **config_overrides: object
) -> Path:
    """An adapter directory with given (A, B) per module and a peft-written config."""
    root.mkdir(parents=True)
    config = json.loads((template / ADAPTER_CONFIG).read_text())
    config.update(config_overrides)
    (root / ADAPTER_CONFIG).write_text(json.dumps(config))
    flat = {}
    for module, (a, b) in tensors.items():
        flat[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        flat[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(flat, str(root / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return root


def random_factors(seed: int, scale: float = 1.0, r: int = R) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(r, i, generator=g) * scale, torch.randn(o, r, generator=g) * scale)
            for m, (o, i) in SHAPES.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


# -- loading ----------------------------------------------------------------------------------


def test_load_peft_adapter(template: Path) -> None:
    adapter = load_adapter(template, reference=SHAPES)
    assert adapter.modules == ["enc", "out"] and adapter.r == R and adapter.scale == ALPHA / R
    assert adapter.shapes == SHAPES
    assert adapter.sha256 == adapter_sha256(template) and len(adapter.sha256) == 64
    a, b = adapter.lora_a["enc"], adapter.lora_b["enc"]
    assert torch.allclose(delta_weights(adapter)["enc"], (ALPHA / R) * b @ a)


def test_rslora_scale(tmp_path: Path, base: Tiny) -> None:
    d = tmp_path / "rs"
    peft_adapter(base, d, seed=2, use_rslora=True)
    assert load_adapter(d).scale == pytest.approx(ALPHA / math.sqrt(R))


def test_refuses_wrong_shapes(tmp_path: Path, template: Path) -> None:
    factors = random_factors(1)
    factors["enc"] = (torch.randn(R + 1, 8), torch.randn(16, R + 1))  # consistent, but not r
    with pytest.raises(InvalidAdapter, match="r=4"):
        load_adapter(write_adapter(tmp_path / "r", factors, template))
    factors = random_factors(1)
    factors["enc"] = (torch.randn(R, 9), torch.randn(16, R))  # in_features 9 instead of 8
    d = write_adapter(tmp_path / "in", factors, template)
    load_adapter(d)  # self-consistent...
    with pytest.raises(InvalidAdapter, match="shapes"):
        load_adapter(d, reference=SHAPES)  # ...but not for this base model
    factors = random_factors(1)
    factors["enc"] = (torch.randn(R, 8, 1), torch.randn(16, R))
    with pytest.raises(InvalidAdapter):
        load_adapter(write_adapter(tmp_path / "3d", factors, template))


def test_refuses_mismatched_target_modules(tmp_path: Path, template: Path) -> None:
    # Tensors for a module the config does not target.
    with pytest.raises(InvalidAdapter, match="target_modules"):
        load_adapter(write_adapter(tmp_path / "a", random_factors(1), template, target_modules=["enc"]))
    # Config and tensors agree, but the base model expects both modules.
    only_enc = {"enc": random_factors(1)["enc"]}
    d = write_adapter(tmp_path / "b", only_enc, template, target_modules=["enc"])
    with pytest.raises(InvalidAdapter, match="missing \\['out'\\]"):
        load_adapter(d, reference=SHAPES)
    # Tensor names that are not LoRA factors.
    d = write_adapter(tmp_path / "c", random_factors(1), template)
    save_file({"base_model.model.enc.weight": torch.zeros(16, 8)}, str(d / ADAPTER_WEIGHTS))
    with pytest.raises(InvalidAdapter, match="not a LoRA factor"):
        load_adapter(d)


def test_load_adapters_reports_instead_of_failing(tmp_path: Path, template: Path) -> None:
    good = write_adapter(tmp_path / "good", random_factors(1), template)
    bad = write_adapter(tmp_path / "bad", random_factors(2), template)
    (bad / "pytorch_model.bin").write_bytes(b"x")
    loaded, rejected = load_adapters([good, bad], reference=SHAPES)
    assert [a.path for a in loaded] == [good]
    assert len(rejected) == 1 and rejected[0].source == str(bad) and "pickle" in rejected[0].reason


# -- merging ----------------------------------------------------------------------------------


def test_single_adapter_merges_to_itself_and_peft_loads_it(tmp_path: Path, base: Tiny) -> None:
    original = peft_adapter(base, tmp_path / "a", seed=3)
    adapter = load_adapter(tmp_path / "a", reference=SHAPES)
    for method in ("weighted_mean", "trimmed_mean", "median"):
        result = merge_adapters([adapter], method=method)
        assert result.max_truncation_error < 1e-6 and result.clipped == [] and result.rejected == []
        for module, expected in delta_weights(adapter, torch.float64).items():
            assert torch.allclose(result.delta(module), expected, atol=1e-5), (method, module)

    result = merge_adapters([adapter])
    sha = save_adapter(result, tmp_path / "merged", {"base_model_name_or_path": "tiny"})
    assert sha == adapter_sha256(tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert load_adapter(tmp_path / "merged", reference=SHAPES).config["base_model_name_or_path"] == "tiny"

    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "merged")).eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(x), original(x), atol=1e-5)
        assert not torch.allclose(base(x), original(x), atol=1e-3)  # the adapter does something


def test_two_adapters_merge_to_the_weighted_mean_up_to_svd_truncation(tmp_path: Path, template: Path) -> None:
    a1 = load_adapter(write_adapter(tmp_path / "1", random_factors(1), template))
    a2 = load_adapter(write_adapter(tmp_path / "2", random_factors(2), template))
    result = merge_adapters([a1, a2], weights=[1.0, 3.0])
    assert result.weights == [0.25, 0.75] and result.clipped == []
    for module in SHAPES:
        mean = 0.25 * a1.delta(module) + 0.75 * a2.delta(module)
        u, s, vh = torch.linalg.svd(mean, full_matrices=False)
        best = (u[:, :R] * s[:R]) @ vh[:R]  # Eckart-Young: the closest rank-r matrix
        assert torch.allclose(result.delta(module), best, atol=1e-5)
        expected_error = float(torch.sqrt((s[R:] ** 2).sum() / (s**2).sum()))
        assert result.truncation_error[module] == pytest.approx(expected_error, abs=1e-6)
    assert result.truncation_error["enc"] > 0.05  # rank 2r mean: truncation is real here...
    assert result.truncation_error["out"] < 1e-6  # ...but out is 4x16: rank <= r = 4 anyway


def test_mean_of_rank_r_is_exact(tmp_path: Path, template: Path) -> None:
    # Same A (row space), different B: the mean has rank <= r, so nothing is truncated.
    f1, f2 = random_factors(1), random_factors(2)
    f2 = {m: (f1[m][0], f2[m][1]) for m in SHAPES}
    a1 = load_adapter(write_adapter(tmp_path / "1", f1, template))
    a2 = load_adapter(write_adapter(tmp_path / "2", f2, template))
    result = merge_adapters([a1, a2])
    assert result.max_truncation_error < 1e-6
    for module in SHAPES:
        assert torch.allclose(result.delta(module), (a1.delta(module) + a2.delta(module)) / 2, atol=1e-5)


def test_merge_to_another_rank_and_mixed_ranks(tmp_path: Path, template: Path) -> None:
    a1 = load_adapter(write_adapter(tmp_path / "1", random_factors(1), template))
    a8 = load_adapter(write_adapter(tmp_path / "8", random_factors(2, r=8), template, r=8, lora_alpha=16))
    result = merge_adapters([a1, a8], rank=8)  # ΔW spaces are comparable whatever the factors' r
    assert result.config["r"] == 8 and result.lora_a["enc"].shape == (8, 8) and result.lora_b["out"].shape == (4, 8)
    assert result.truncation_error["enc"] < 1e-6  # rank(mean) <= min(16, 8) = 8


def test_norm_bound_clips_an_outlier(tmp_path: Path, template: Path) -> None:
    honest = [load_adapter(write_adapter(tmp_path / f"h{i}", random_factors(i), template)) for i in range(4)]
    outlier = load_adapter(write_adapter(tmp_path / "big", random_factors(99, scale=10.0), template))
    result = merge_adapters([*honest, outlier], rank=16)
    clipped_sources = {c.source for c in result.clipped}
    assert clipped_sources == {str(outlier.path)}
    for module in SHAPES:
        norms = [float(torch.linalg.matrix_norm(a.delta(module))) for a in [*honest, outlier]]
        assert result.norm_bounds[module] == pytest.approx(3.0 * sorted(norms)[2])
        # The merge is the mean with the outlier's ΔW scaled down to the bound, direction kept.
        big = outlier.delta(module)
        big = big * (result.norm_bounds[module] / torch.linalg.matrix_norm(big))
        expected = (sum(a.delta(module) for a in honest) + big) / 5
        assert torch.allclose(result.delta(module), expected, atol=1e-4)

    # An explicit bound applies to every adapter; math.inf disables clipping.
    tight = merge_adapters(honest, max_norm=1.0, rank=16)
    assert len(tight.clipped) == 8 and all(c.bound == 1.0 for c in tight.clipped)
    assert merge_adapters([*honest, outlier], max_norm=math.inf).clipped == []


@pytest.mark.parametrize("method", ["trimmed_mean", "median"])
def test_robust_methods_resist_one_poisoned_adapter(tmp_path: Path, template: Path, method: str) -> None:
    common = random_factors(0)
    honest = []
    for i in range(6):
        g = torch.Generator().manual_seed(100 + i)
        noisy = {m: (a + 0.05 * torch.randn(a.shape, generator=g), b) for m, (a, b) in common.items()}
        honest.append(load_adapter(write_adapter(tmp_path / f"h{i}", noisy, template)))
    poisoned_factors = {m: (a, -40.0 * b) for m, (a, b) in common.items()}  # flips and inflates ΔW
    poisoned = load_adapter(write_adapter(tmp_path / "poison", poisoned_factors, template))
    adapters = [*honest, poisoned]

    for module in SHAPES:
        clean = sum(a.delta(module) for a in honest) / len(honest)
        naive = merge_adapters(adapters, method="weighted_mean", max_norm=math.inf, rank=16)
        robust = merge_adapters(adapters, method=method, max_norm=math.inf, rank=16)
        assert rel(naive.delta(module), clean) > 3.0
        assert rel(robust.delta(module), clean) < 0.1


def test_merge_rejects_misfits_and_zero_weights(tmp_path: Path, template: Path) -> None:
    a1 = load_adapter(write_adapter(tmp_path / "1", random_factors(1), template))
    a2 = load_adapter(write_adapter(tmp_path / "2", random_factors(2), template))
    other = {"enc": (torch.randn(R, 8), torch.randn(16, R))}
    odd = load_adapter(write_adapter(tmp_path / "odd", other, template, target_modules=["enc"]))
    nan = Adapter({m: a.clone() for m, a in a1.lora_a.items()}, dict(a1.lora_b), a1.config, label="in-memory")
    nan.lora_a["enc"][0, 0] = float("nan")

    result = merge_adapters([a1, odd, nan, a2], weights=[1, 1, 1, 0])
    assert result.sources == [str(a1.path)]
    assert {r.source: r.reason.split(" ")[0] for r in result.rejected} == {
        str(odd.path): "target", "in-memory": "contains", str(a2.path): "weight"}
    with pytest.raises(InvalidAdapter, match="no adapter left"):
        merge_adapters([a1], weights=[0])
    with pytest.raises(ValueError):
        merge_adapters([a1], method="mode")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        merge_adapters([a1, a2], weights=[1.0])
    with pytest.raises(ValueError):
        merge_adapters([])


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path: Path, template: Path) -> None:
    result = merge_adapters([load_adapter(template)])
    out = tmp_path / "cands" / "c1"
    save_adapter(result, out)
    with pytest.raises(FileExistsError):
        save_adapter(result, out)
    save_adapter(result, out, overwrite=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["c1"]  # no temp dirs left behind
    with pytest.raises(InvalidAdapter):
        save_adapter(result, tmp_path / "bad", {"use_dora": True})
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == R
    summary = result.summary()
    json.dumps(summary)
    assert summary["n_adapters"] == 1 and summary["method"] == "weighted_mean"


# -- updates from a start (distributed rounds) --------------------------------------------------


def test_merge_on_updates_from_a_start(tmp_path: Path, template: Path) -> None:
    start = load_adapter(write_adapter(tmp_path / "start", random_factors(5), template))
    a = load_adapter(write_adapter(tmp_path / "a", random_factors(1), template))
    b = load_adapter(write_adapter(tmp_path / "b", random_factors(2, scale=3.0), template))
    # One slice merges to itself, start or not.
    alone = merge_adapters([a], start=start)
    assert alone.start == str(start.path) and alone.max_truncation_error < 1e-6
    for module in SHAPES:
        assert rel(alone.delta(module), a.delta(module)) < 1e-5
    # A scale applies to the update, not to the whole ΔW: start + c·(ΔW_a − ΔW_start).
    half = merge_adapters([a], start=start, update_scales=[0.5], rank=2 * R)
    for module in SHAPES:
        expected = start.delta(module) + 0.5 * (a.delta(module) - start.delta(module))
        assert rel(half.delta(module), expected) < 1e-5
    # The norm bound acts on the updates: b's is several times a's, clipped to 2× the lower median.
    bounded = merge_adapters([a, b], start=start, norm_factor=2.0, rank=2 * R)
    assert {c.source for c in bounded.clipped} == {str(b.path)}
    # With norm units saying b's update is expected to be 10× bigger, nothing is clipped.
    assert merge_adapters([a, b], start=start, norm_factor=2.0, norm_units=[1.0, 10.0], rank=2 * R).clipped == []
    # A gain (a server learning rate) multiplies the combined update, not the start:
    # start + g·mean(updates); 2 slices with gain 2 are the sum of their updates.
    summed = merge_adapters([a, b], start=start, update_gain=2.0, max_norm=math.inf, rank=3 * R)
    assert summed.summary()["update_gain"] == 2.0
    for module in SHAPES:
        expected = a.delta(module) + b.delta(module) - start.delta(module)
        assert rel(summed.delta(module), expected) < 1e-5
    with pytest.raises(ValueError, match="update_gain"):
        merge_adapters([a], update_gain=0.0)
    with pytest.raises(ValueError, match="update_scales"):
        merge_adapters([a, b], update_scales=[1.0, 0.0])
    with pytest.raises(ValueError, match="norm_units"):
        merge_adapters([a, b], norm_units=[1.0])
