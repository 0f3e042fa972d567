"""`inspect`: what an export folder or an engine folder holds, and whether its files still match their hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aira_opt.folders import EngineFolder, ExportFolder, open_folder
from aira_opt.precision.kernels import kernel_summary

ENGINE_KEYS = ("tensorrt_version", "gpu", "compute_capability", "target", "hardware_compatibility_level", "precision")
EXPORT_KEYS = ("folder", "precision", "source_model", "opset", "files", "kept_fp32", "quantization", "kernels", "graph")


def inspect_folder(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """(summary as JSON-ready data, lines for people); summary["problems"] is empty when every hash matches."""
    opened = open_folder(folder)
    if isinstance(opened, EngineFolder):
        return inspect_engine(opened)
    return inspect_export(opened)


def inspect_engine(folder: EngineFolder) -> tuple[dict[str, Any], list[str]]:
    record = folder.record.to_json()
    problems = folder.verify()
    summary = {"folder": str(folder.path), **{k: record.get(k) for k in ENGINE_KEYS},
               "profiles": [p["name"] for p in folder.record.profiles], "hashes_ok": not problems,
               "problems": problems}
    lines = [f"{k}: {v}" for k, v in summary.items() if k not in ("hashes_ok", "problems")]
    lines.append("plan sha256: matches model.json" if not problems else "problems: " + "; ".join(problems))
    return summary, lines


def inspect_export(folder: ExportFolder) -> tuple[dict[str, Any], list[str]]:
    manifest = folder.manifest
    problems = folder.verify()
    unknown = folder.unlisted_files()
    try:
        metadata = folder.metadata
    except Exception as exc:  # onnx's DecodeError and friends: a truncated or foreign model.onnx
        metadata = {}
        if not problems:
            problems.append(f"model.onnx: does not parse as ONNX ({type(exc).__name__})")
    summary: dict[str, Any] = {
        "folder": str(folder.path), "precision": manifest.precision,
        "source_model": manifest.source_spec, "opset": manifest.opset,
        "files": len(manifest.files), "hashes_ok": not problems, "problems": problems,
        "contract": manifest.contract, "kept_fp32": manifest.kept_fp32,
        "quantization": manifest.quantization, "graph": manifest.graph,
        "kernels": kernel_summary(manifest.kernels) or None, "metadata": metadata, "unlisted_files": unknown,
        "genai_config": (folder.path / "genai_config.json").is_file(),
    }
    lines = [f"{key}: {summary[key]}" for key in EXPORT_KEYS]
    contract = manifest.contract
    for name, shape in {**contract.get("inputs", {}), **contract.get("outputs", {})}.items():
        if ".0." in name or not name.startswith(("past_key_values", "present")):
            lines.append(f"  {name}: {shape}")
    lines += [f"metadata {key}: {value}" for key, value in summary["metadata"].items()]
    lines.append(f"genai_config.json: {'present' if summary['genai_config'] else 'missing'}")
    lines.append("hashes: all match" if not problems else "hashes: " + "; ".join(problems)
                 + " (export again to replace the folder)")
    if unknown:
        lines.append(f"warning: not in the manifest (left alone, not checked): {', '.join(unknown)}")
    return summary, lines
