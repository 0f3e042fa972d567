"""`inspect`: what an export folder or an engine folder holds, and whether its files still match their hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aira_opt.core.artifacts import read_manifest, unlisted_files, verify_manifest
from aira_opt.export.portable import read_metadata
from aira_opt.precision.kernels import kernel_summary
from aira_opt.tensorrt.engines import SIDECAR, verify_engine_folder

ENGINE_KEYS = ("tensorrt_version", "gpu", "compute_capability", "target", "hardware_compatibility_level", "precision")
EXPORT_KEYS = ("folder", "precision", "source_model", "opset", "files", "kept_fp32", "quantization", "kernels", "graph")


def inspect_folder(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """(summary as JSON-ready data, lines for people); summary["problems"] is empty when every hash matches."""
    if (folder / SIDECAR).is_file():
        return inspect_engine(folder)
    return inspect_export(folder)


def inspect_engine(folder: Path) -> tuple[dict[str, Any], list[str]]:
    sidecar = json.loads((folder / SIDECAR).read_text())
    problems = verify_engine_folder(folder)
    summary = {"folder": str(folder), **{k: sidecar.get(k) for k in ENGINE_KEYS},
               "profiles": [p["name"] for p in sidecar.get("profiles", [])], "hashes_ok": not problems,
               "problems": problems}
    lines = [f"{k}: {v}" for k, v in summary.items() if k not in ("hashes_ok", "problems")]
    lines.append("plan sha256: matches model.json" if not problems else "problems: " + "; ".join(problems))
    return summary, lines


def inspect_export(folder: Path) -> tuple[dict[str, Any], list[str]]:
    manifest = read_manifest(folder)
    problems = verify_manifest(folder)
    unknown = unlisted_files(folder)
    try:
        metadata = read_metadata(folder)
    except Exception as exc:  # onnx's DecodeError and friends: a truncated or foreign model.onnx
        metadata = {}
        if not problems:
            problems.append(f"model.onnx: does not parse as ONNX ({type(exc).__name__})")
    summary: dict[str, Any] = {
        "folder": str(folder), "precision": manifest.get("precision"),
        "source_model": manifest.get("source_model", {}).get("source"), "opset": manifest.get("opset"),
        "files": len(manifest.get("files", {})), "hashes_ok": not problems, "problems": problems,
        "contract": manifest.get("contract"), "kept_fp32": manifest.get("kept_fp32"),
        "quantization": manifest.get("quantization"), "graph": manifest.get("graph", {"fused": False}),
        "kernels": kernel_summary(manifest) or None, "metadata": metadata, "unlisted_files": unknown,
        "genai_config": (folder / "genai_config.json").is_file(),
    }
    lines = [f"{key}: {summary[key]}" for key in EXPORT_KEYS]
    contract = manifest.get("contract") or {}
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
