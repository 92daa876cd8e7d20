"""Every MoE architecture in the installed mlx-lm is supported or explicitly unsupported.

An mlx-lm upgrade that adds or renames an MoE model type fails this test, naming it, instead of
silently leaving it unsupported.
"""

import importlib.metadata
import pkgutil
import re
from pathlib import Path

import mlx_lm.models
from mlx_lm.utils import MODEL_REMAPPING
from mlxfun.core import plugins

MOE_MARKERS = re.compile(
    r"switch_layers|SwitchGLU|SwitchMLP|num_experts|n_routed_experts|moe_num_experts"
)


def moe_modules() -> set[str]:
    """Model modules that define MoE layers, or import a module that does."""
    folder = Path(mlx_lm.models.__file__).parent
    sources = {
        m.name: (folder / f"{m.name}.py").read_text() for m in pkgutil.iter_modules([str(folder)])
    }
    sources.pop("switch_layers", None)
    found = {name for name, text in sources.items() if MOE_MARKERS.search(text)}
    changed = True
    while changed:
        changed = False
        for name, text in sources.items():
            imports = set(re.findall(r"from \.(\w+) import", text))
            imports |= {
                m.strip()
                for line in re.findall(r"from \. import ([\w, ]+)", text)
                for m in line.split(",")
            }
            if name not in found and imports & found:
                found.add(name)
                changed = True
    return found


def known_model_types() -> tuple[set[str], dict[str, str]]:
    supported, unsupported = set(), {}
    for info in plugins.registry()["adapter"].values():
        supported |= set(info.obj.model_types)
        unsupported.update(getattr(info.obj, "unsupported", {}) or {})
    return supported, unsupported


def test_every_moe_model_type_is_covered():
    supported, unsupported = known_model_types()
    covered = supported | set(unsupported)
    missing = sorted(m for m in moe_modules() if m not in covered)
    assert not missing, (
        f"MoE model types neither supported nor marked unsupported: {', '.join(missing)}"
    )


def test_aliases_of_moe_types_are_covered():
    supported, unsupported = known_model_types()
    moe = moe_modules()
    missing = sorted(
        alias
        for alias, target in MODEL_REMAPPING.items()
        if target in moe and alias not in supported | set(unsupported)
    )
    assert not missing, f"config aliases of MoE model types not covered: {', '.join(missing)}"


def test_only_muse_spark_is_refused_outright():
    """Every MoE model type of the installed mlx-lm has an adapter except muse_spark (its
    forward runs Metal-only kernels). The other types with a refusal reason (qwen3_5, jamba,
    gemma4, ...) are refused only for configs that mlx-lm builds without MoE layers. dbrx (list
    experts) and longcat_flash(_ngram) (zero experts) have adapters."""
    supported, unsupported = known_model_types()
    refused = sorted(m for m in moe_modules() | set(unsupported) if m not in supported)
    assert refused == ["muse_spark"], refused
    assert {"dbrx", "longcat_flash", "longcat_flash_ngram"} <= supported
    assert "Metal" in unsupported["muse_spark"]


def test_unsupported_types_give_the_reason():
    _, unsupported = known_model_types()
    for model_type, reason in unsupported.items():
        assert reason and len(reason) > 10, model_type


def test_installed_mlx_lm_is_in_every_adapters_verified_range():
    from packaging.specifiers import SpecifierSet

    installed = importlib.metadata.version("mlx-lm")
    for info in plugins.registry()["adapter"].values():
        if info.distribution != "mlxfun-adapters":
            continue
        spec = SpecifierSet(info.obj.mlx_lm_versions)
        assert installed in spec, f"{info.name} verified for mlx-lm {spec}, installed {installed}"
