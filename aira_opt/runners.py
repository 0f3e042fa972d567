"""Which runner opens a folder: ONNX Runtime for an export folder, TensorRT for an engine folder. It sits above
both runtimes, so neither knows of the other."""

from __future__ import annotations

from pathlib import Path

from aira_opt.core.errors import AiraOptError, DraftMismatchError
from aira_opt.folders import EngineFolder, ExportFolder, open_folder
from aira_opt.runtime.ort import OrtDecoder
from aira_opt.runtime.protocol import Decoder
from aira_opt.tensorrt.engines import TrtDecoder


def chosen_folder(onnx_dir: Path | None, engine_dir: Path | None) -> ExportFolder | EngineFolder:
    """The folder of --onnx DIR or --engine DIR; exactly one must be given."""
    if (onnx_dir is None) == (engine_dir is None):
        raise AiraOptError("give exactly one of --onnx DIR (ONNX Runtime) or --engine DIR (TensorRT engine folder)")
    return ExportFolder(onnx_dir) if onnx_dir is not None else EngineFolder(engine_dir)  # type: ignore[arg-type]


def open_runner(folder: Path | str | ExportFolder | EngineFolder, provider: str = "cpu",
                threads: int | None = None, shared_threads: bool = False) -> Decoder:
    """The (not yet activated) runner for a folder: TensorRT for an engine folder, else ONNX Runtime with
    `provider` and `threads` (shared_threads: on the process's one thread pool, for runners that take turns)."""
    opened = open_folder(folder)
    if isinstance(opened, EngineFolder):
        return TrtDecoder(opened)
    return OrtDecoder(opened, provider=provider, threads=threads, shared_threads=shared_threads)


def draft_mismatches(target: ExportFolder | EngineFolder, draft: ExportFolder | EngineFolder) -> list[str]:
    """Every way `draft` cannot propose tokens for `target`: its proposals are target token ids, so the two must
    share the vocabulary and the tokenizer's mapping, and the draft must reach as far as the target."""
    problems = []
    target_vocab, draft_vocab = target.contract.vocab_size, draft.contract.vocab_size
    if target_vocab != draft_vocab:
        problems.append(f"another vocabulary ({draft_vocab} ids, the target has {target_vocab})")
    target_ids, draft_ids = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    differ = sum(draft_ids.get(piece) != i for piece, i in target_ids.items()) + len(set(draft_ids) - set(target_ids))
    if differ:
        problems.append(f"another tokenizer ({differ} of its tokens map to other ids than the target's)")
    if draft.context_length < target.context_length:
        problems.append(f"a context shorter than the target's ({draft.context_length} positions, the target has "
                        f"{target.context_length})")
    return problems


FolderLike = Path | str | ExportFolder | EngineFolder


def check_draft(target: FolderLike, draft: FolderLike) -> ExportFolder | EngineFolder:
    """The draft's folder, refused in one line when it cannot propose for `target` (every reason named)."""
    target_folder, draft_folder = open_folder(target), open_folder(draft)
    problems = draft_mismatches(target_folder, draft_folder)
    if problems:
        raise DraftMismatchError(f"draft {draft_folder.path} cannot propose for {target_folder.path}: it has "
                                 + "; ".join(problems))
    return draft_folder


def open_draft(target: FolderLike, draft: FolderLike, provider: str = "cpu", threads: int | None = None,
               shared_threads: bool = False) -> Decoder:
    """The (not yet activated) runner of a draft model for `target`, refused in one line when it does not fit.
    The two take turns, so their thread pools must not fight over the cores: either both run on the process's
    shared pool (shared_threads; open the target so too), or the draft runs on the calling thread alone (one
    intra-op thread: no pool of its own spinning while the target runs)."""
    return open_runner(check_draft(target, draft), provider, threads if shared_threads else 1,
                       shared_threads=shared_threads)
