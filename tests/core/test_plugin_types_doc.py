"""docs/plugins.md's Types section is what scripts/plugin_types_doc.py generates from the code,
so the documented types cannot drift from what mlxfun passes to plugins."""

import importlib.util
from pathlib import Path

import attrs
from mlxfun.core import hookspecs, types

ROOT = Path(__file__).resolve().parents[2]


def generator():
    spec = importlib.util.spec_from_file_location(
        "plugin_types_doc", ROOT / "scripts" / "plugin_types_doc.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_types_section_is_generated_from_the_code():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    section = generator().render()
    assert section in docs, (
        "docs/plugins.md's Types section differs from mlxfun.core.types / hookspecs; run "
        "python scripts/plugin_types_doc.py --write"
    )


def test_every_hook_kind_and_argument_type_is_documented():
    section = generator().render()
    for name in dir(hookspecs):
        if name.startswith("register_"):
            assert f"`{name}(" in section
    for cls in (
        types.LayerObservation,
        types.SelectOptions,
        types.Selection,
        types.CompressRequest,
    ):
        for field in attrs.fields(cls):
            assert field.metadata.get("doc"), f"{cls.__name__}.{field.name} has no doc"
            shown = field.type.replace("|", "\\|")  # escaped in the Markdown table
            assert f"| `{field.name}` | `{shown}` |" in section
    for kind in types.KINDS:
        for attribute in types.REQUIRED_ATTRIBUTES[kind]:
            assert f"`{attribute}" in section, (kind, attribute)


def test_the_write_mode_replaces_only_the_section(tmp_path):
    module = generator()
    text = f"before\n{module.BEGIN}\nold\n{module.END}\nafter\n"
    assert module.replaced(text, "NEW\n") == "before\nNEW\nafter\n"
