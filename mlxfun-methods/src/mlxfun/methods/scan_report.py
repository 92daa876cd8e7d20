"""Scan reports as inputs: ``REPORT[:GROUP]`` into ``{decoder layer index: [expert ids]}``,
checked against the model it is applied to (``--protect-from`` / ``--target-from`` of prune and
merge, and any later command that takes expert groups)."""

import json
from pathlib import Path

from mlxfun.core.errors import MlxfunError


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """``report.json`` or ``report.json:group`` (a path that itself contains ':' works when the
    file exists)."""
    spec = str(spec)
    path, sep, group = spec.rpartition(":")
    if sep and path and not Path(spec).is_file() and "/" not in group and "\\" not in group:
        return Path(path), group or None
    return Path(spec), None


def load_report(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MlxfunError(f"scan report {path} does not exist (write one with mlxfun safety-scan)")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MlxfunError(f"{path} is not a scan report (not valid JSON: {exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("groups"), dict):
        raise MlxfunError(
            f"{path} is not a scan report (no 'groups'); write one with mlxfun safety-scan"
        )
    if not isinstance(report.get("fingerprint"), dict):
        raise MlxfunError(f"{path} is not a scan report (no model 'fingerprint')")
    return report


def _is_twin(entry) -> bool:
    """A group of the experts the reference set prefers (format 2 reports: sign -1)."""
    return isinstance(entry, dict) and entry.get("sign") == -1


def group_experts(report: dict, group: str | None, path) -> dict[int, list[int]]:
    """One group's experts, or with ``group`` None the union of the report's groups that
    prefer the scan's first set (harmful, domain): the twins, which the reference set prefers,
    count only when named."""
    groups = report["groups"]
    if group is not None and group not in groups:
        known = ", ".join(sorted(groups)) or "none"
        raise MlxfunError(f"{path} has no group {group!r}; its groups: {known}")
    if group is not None:
        names = [group]
    else:
        names = sorted(name for name, entry in groups.items() if not _is_twin(entry))
    result: dict[int, set] = {}
    for name in names:
        experts = groups[name].get("experts", {}) if isinstance(groups[name], dict) else None
        if not isinstance(experts, dict):
            raise MlxfunError(f"{path}: group {name!r} has no 'experts' map")
        for layer, ids in experts.items():
            if ids:
                result.setdefault(int(layer), set()).update(int(e) for e in ids)
    return {layer: sorted(ids) for layer, ids in sorted(result.items())}


def model_dir_fingerprint(model_dir) -> dict:
    """The fingerprint ``mlxfun collect`` and the scans record, from the model's module tree
    (no weight is read)."""
    from mlxfun.core import plugins, slicing
    from mlxfun.core.config import read_config
    from mlxfun.core.stats import model_fingerprint

    config = read_config(model_dir)
    adapter = plugins.adapter_for_config(config)
    skeleton, _ = slicing.model_skeleton(model_dir)
    return model_fingerprint(config, adapter.moe_layers(skeleton))


def check_report_model(report: dict, fingerprint: dict, path, option: str) -> None:
    from mlxfun.core.stats import fingerprint_difference

    difference = fingerprint_difference(report["fingerprint"], fingerprint)
    if difference is not None:
        difference = difference.replace("the stats file has", "the report has")
        raise MlxfunError(
            f"{option} {path}: the report was made on another model ({difference}); scan this model"
        )


def experts_from_reports(specs, model_dir, option: str = "--protect-from") -> dict:
    """The union of the experts that ``specs`` (``REPORT[:GROUP]`` each) name, each report
    checked against ``model_dir``."""
    result: dict[int, set] = {}
    fingerprint = None
    for spec in specs or ():
        path, group = parse_spec(spec)
        report = load_report(path)
        if fingerprint is None:
            fingerprint = model_dir_fingerprint(model_dir)
        check_report_model(report, fingerprint, path, option)
        for layer, ids in group_experts(report, group, path).items():
            result.setdefault(layer, set()).update(ids)
    return {layer: sorted(ids) for layer, ids in result.items()}


def union_expert_lists(*mappings) -> dict:
    """Union of ``{layer or "*": [experts]}`` maps (``--protect`` with ``--protect-from``)."""
    result: dict = {}
    for mapping in mappings:
        for layer, ids in mapping.items():
            result.setdefault(layer, set()).update(ids)
    return {layer: sorted(ids) for layer, ids in result.items()}


def expert_option(values, specs, model_dir, option: str = "--protect") -> dict:
    """``--protect`` (or ``--target``) joined with ``--protect-from`` (``--target-from``)."""
    from .prune import parse_expert_lists

    return union_expert_lists(
        parse_expert_lists(values, option),
        experts_from_reports(specs, model_dir, f"{option}-from"),
    )
