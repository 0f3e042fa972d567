"""`aira-opt`: the command line. It parses options and calls the modules; no logic lives here."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from aira_opt import api
from aira_opt._version import __version__
from aira_opt.benchmark.backends import RUNNERS, BenchSources
from aira_opt.benchmark.jobs import bench
from aira_opt.benchmark.measure import Setting
from aira_opt.benchmark.report import render_text, report_json, write_outputs
from aira_opt.parity import BASELINES, check_folder, report_table
from aira_opt.core.errors import AiraOptError, Terminated, UnexpectedError
from aira_opt.core.progress import print_progress
from aira_opt.core.tables import text_table
from aira_opt.evaluation import eval_table
from aira_opt.source.corpus import CORPORA
from aira_opt.exporting.exporters import DEFAULT_EXPORTER, EXPORTERS
from aira_opt.folders import ExportFolder
from aira_opt.generation.defaults import speculation_from
from aira_opt.generation.speculative import MAX_TOKENS, METHODS
from aira_opt.inspection import inspect_folder
from aira_opt.pipeline.export_plan import kernel_choices
from aira_opt.precision.recipe import ALGORITHMS
from aira_opt.precision.variants import BLOCK_SIZES, HEAD_BITS, exportable_names
from aira_opt.runners import chosen_folder
from aira_opt.runtime.providers import PROVIDERS
from aira_opt.serve.repository import ServingOptions, write_repository
from aira_opt.serve.server import LOCAL_HOST, Ports, serve_folder
from aira_opt.source.models import spec_name
from aira_opt.tensorrt.build_plan import TARGETS, BuildOptions, describe_plan, make_plan
from aira_opt.tensorrt.engines import build_engine

model_option = click.option("--model", "model_spec", default="aira-tiny", show_default=True, metavar="SPEC",
                            help="aira-tiny (bundled), aira-2-1b1-random, smollm2-135m, a local folder, a .gguf file, or a hub id.")
num_layers_option = click.option("--num-layers", type=click.IntRange(min=1), default=None,
                                 help="Depth override for a random preset (quick runs).")
onnx_dir_option = click.option("--onnx", "onnx_dir", default=None,
                               type=click.Path(exists=True, file_okay=False, path_type=Path),
                               help="An aira-opt export folder (ONNX Runtime).")
engine_dir_option = click.option("--engine", "engine_dir", default=None,
                                 type=click.Path(exists=True, file_okay=False, path_type=Path),
                                 help="An aira-opt TensorRT engine folder (from `aira-opt build`), instead of --onnx.")
provider_option = click.option("--provider", type=click.Choice(list(PROVIDERS)), default="cpu", show_default=True,
                               help="ONNX Runtime execution provider.")
FROM_EXPORT = "[default: the export's generation_config.json]"
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="ONNX Runtime intra-op threads (default: all cores).")


def openvino_options(command: Any) -> Any:
    """--openvino DIR (repeatable) and --openvino-python FILE, the same for eval and bench."""
    for option in reversed([
        click.option("--openvino", "openvino_dirs", multiple=True,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="An OpenVINO IR folder (optimum-cli export openvino), run by OpenVINO (repeat for "
                          "several)."),
        click.option("--openvino-python", type=click.Path(exists=True, dir_okay=False), default=None,
                     envvar="AIRA_OPT_OPENVINO_PYTHON",
                     help="The python of a virtual environment with openvino-genai and optimum-intel [default: "
                          "this one, when openvino imports here]."),
    ]):
        command = option(command)
    return command


def speculation_options(command: Any) -> Any:
    """--speculative, --speculative-draft and --num-speculative-tokens, the same wherever tokens are decoded."""
    for option in reversed([
        click.option("--speculative", type=click.Choice([*METHODS, "off"]), default=None,
                     help="Propose tokens and verify them in one step of the model; the output stays the model's "
                          "own. ngram: prompt lookup (no second model); draft: --speculative-draft's model "
                          "[default: draft when one is given, else off]."),
        click.option("--speculative-draft", "draft_dir", default=None,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="An export with the same tokenizer that proposes tokens (the int4 export of the same "
                          "model, say)."),
        click.option("--num-speculative-tokens", type=click.IntRange(1, MAX_TOKENS), default=None,
                     help="The most tokens proposed per step; fewer, or none, while few are accepted "
                          "[default: 6 for ngram, 4 for a draft]."),
    ]):
        command = option(command)
    return command


def json_option(what: str) -> Any:
    """`--json PATH|-`, the same in every command: '-' prints to stdout (and the human output goes to stderr)."""
    return click.option("--json", "json_target", default=None, metavar="PATH|-",
                        help=f"Write {what} as JSON to PATH, or to stdout with '-'.")


def emit_json(target: str, data: Any, lines: bool = False) -> None:
    """JSON to stdout ('-') or to a file; with lines=True, `data` is a list written one object per line."""
    text = "\n".join(json.dumps(d) for d in data) if lines else json.dumps(data, indent=2)
    if target == "-":
        click.echo(text)
    else:
        Path(target).write_text(text + "\n")


def human_echo(json_target: str | None) -> Any:
    """Where the human-readable output goes: stderr when the JSON has stdout."""
    return (lambda s="", **kw: click.echo(s, err=True, **kw)) if json_target == "-" else click.echo


class CommandError(click.ClickException):
    """A domain error as Click shows it: `Error: <its one line>`, with its exit code."""

    def __init__(self, error: AiraOptError):
        super().__init__(error.message)
        self.exit_code = error.exit_code


class AiraGroup(click.Group):
    """The boundary: aira-opt's own errors become Click's one-line `Error: ...`; whatever else a command raises
    becomes one too (with a hint), exit 1; with -v the traceback is shown instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except AiraOptError as exc:
            raise CommandError(exc) from exc
        except Exception as exc:
            if ctx.params.get("verbose"):
                raise
            text = str(exc).strip().splitlines()
            raise CommandError(UnexpectedError(f"{type(exc).__name__}: {text[0] if text else 'no message'} "
                                               "(run with -v to see the traceback)")) from exc


@click.group(cls=AiraGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aira-opt")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Take Aira-2-1B1 (and Llama-family models like it) from PyTorch to fast, verified ONNX Runtime and
    TensorRT inference."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        _quiet_libraries()


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "optimum", "torch", "onnxruntime", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # onnxruntime's quantizer logs advice on the root logger ("consider pre-processing"): not for our users.
    logging.getLogger().addFilter(lambda record: "pre-processing before quantization" not in record.getMessage())
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# export ------------------------------------------------------------------------------------------------
@main.command("export")
@model_option
@num_layers_option
@click.option("--precision", type=click.Choice(exportable_names()), default="fp32", show_default=True,
              help="Precision of the ONNX graph.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: export/<model>/<precision>].")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--atol", type=float, default=None, help="Max |logit diff| vs PyTorch accepted by the fp32 validation.")
@click.option("--min-cosine", type=float, default=None,
              help="Lower the post-export sanity bar (min cosine of the logits vs PyTorch) for a recipe you know is "
                   "lossy; `aira-opt eval` then measures the loss.")
@click.option("--block-size", type=int, default=None,
              help=f"int8/int4 only: weights per quantization block, one of {', '.join(map(str, BLOCK_SIZES))} "
                   "[default: 32; 128 is faster, less exact].")
@click.option("--lm-head", type=click.Choice(list(HEAD_BITS)), default=None,
              help="int8/int4 only: the output head's precision [default: int8; float reads it whole every step].")
@click.option("--algorithm", type=click.Choice(list(ALGORITHMS)), default=None,
              help="int4 only: how blocks are rounded: rtn (default), hqq (float zero points: ONNX Runtime's slow "
                   "path), gptq (calibrated).")
@click.option("--source-grid/--no-source-grid", default=None,
              help="int8/int4 only: keep weights that already lie on a 4-bit or 8-bit grid (a GGUF source) exactly "
                   "[default: on]; off rounds them again.")
@click.option("--fuse/--no-fuse", default=None,
              help="Fuse attention into ONNX Runtime's CPU ops (GroupQueryAttention + RotaryEmbedding) "
                   "[default: on for int8/int4, off for fp32; fp16/int8-qdq stay standard-op for TensorRT; "
                   "fp16-cuda/int4-cuda are always fused].")
@click.option("--exporter", "exporter_name", type=click.Choice(list(EXPORTERS)), default=DEFAULT_EXPORTER,
              show_default=True, help="torch: our torch.onnx (dynamo) exporter; optimum: optimum-onnx's, which needs "
                                      "`pip install 'aira-opt[optimum]'` (transformers 4.57).")
@click.option("--kernels", type=click.Choice(kernel_choices()), default="auto", show_default=True,
              envvar="AIRA_OPT_KERNELS",
              help="int8/int4 only: auto times the candidate kernels on this CPU (cached per machine) and takes the "
                   "fastest that passes the sanity bar; default skips the timing; a name forces that kernel.")
def export_cmd(model_spec: str, num_layers: int | None, precision: str, output: Path | None, force: bool,
               atol: float | None, min_cosine: float | None, block_size: int | None, lm_head: str | None,
               algorithm: str | None, source_grid: bool | None, fuse: bool | None, exporter_name: str,
               kernels: str) -> None:
    """Export a model to ONNX with KV cache, validated against PyTorch."""
    folder = api.export(model_spec, precision, output, force=force, on_progress=print_progress, num_layers=num_layers,
                        block_size=block_size, lm_head=lm_head, algorithm=algorithm, source_grid=source_grid,
                        fuse=fuse, atol=atol, min_cosine=min_cosine, exporter=exporter_name, kernels=kernels)
    click.echo(f"wrote {folder.path}")


# generate ----------------------------------------------------------------------------------------------
@main.command("generate")
@onnx_dir_option
@engine_dir_option
@click.argument("question", required=False)
@provider_option
@threads_option
@click.option("--greedy", is_flag=True, help="Argmax instead of sampling (the repetition penalty still applies).")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--num-return-sequences", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help=FROM_EXPORT)
@click.option("--temperature", type=float, default=None, help=FROM_EXPORT)
@click.option("--top-k", type=click.IntRange(min=0), default=None, help=FROM_EXPORT)
@click.option("--top-p", type=float, default=None, help=FROM_EXPORT)
@click.option("--repetition-penalty", type=float, default=None, help=FROM_EXPORT)
@speculation_options
@json_option("one object per question (one per line) instead of streaming the answer")
def generate_cmd(onnx_dir: Path | None, engine_dir: Path | None, question: str | None, provider: str,
                 threads: int | None, greedy: bool, seed: int | None, num_return_sequences: int,
                 max_new_tokens: int | None, temperature: float | None, top_k: int | None, top_p: float | None,
                 repetition_penalty: float | None, speculative: str | None, draft_dir: Path | None,
                 num_speculative_tokens: int | None, json_target: str | None) -> None:
    """Answer a question (or one per line of standard input) with our generation loop."""
    folder = chosen_folder(onnx_dir, engine_dir)
    options = dict(greedy=greedy, seed=seed, num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                   speculative=speculative, num_speculative_tokens=num_speculative_tokens)
    questions = [question] if question is not None else (line.strip() for line in sys.stdin)
    answers = []
    # A draft and its target share ONNX Runtime's process-wide thread pool: this process ends with the command.
    with api.load(folder, provider, threads, draft=draft_dir, shared_threads=True) as model:
        model.options(**options)  # a bad value is one line before any question is read
        for q in questions:
            if not q:
                continue
            if json_target == "-":
                click.echo(json.dumps(model.answer(q, **options).to_json()))  # as each answer is ready
            elif json_target is not None:
                answers.append(model.answer(q, **options).to_json())
            elif num_return_sequences > 1:
                for i, answer in enumerate(model.generate(q, **options), 1):
                    click.echo(f"[{i}] {answer}")
            else:
                for piece in model.stream(q, **options):
                    click.echo(piece, nl=False)
                click.echo()
    if json_target not in (None, "-"):
        emit_json(json_target, answers, lines=True)


# build -------------------------------------------------------------------------------------------------
@main.command("build")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An fp16 or int8-qdq export folder (fp32 builds an fp32 engine).")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Engine folder [default: engines/<model>/<precision>/<target>].")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-seq", type=click.IntRange(min=1), default=None,
              help="Most new tokens in one call, the longest prefill [default: 512, or the model's context if less].")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Most tokens of past + new [default: the model's positions].")
@click.option("--target", type=click.Choice(TARGETS), default="a100", show_default=True)
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read and update this timing cache file.")
@click.option("--workspace", "workspace_gib", type=float, default=8.0, show_default=True, help="GiB.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=3, show_default=True,
              help="TensorRT builder optimization level.")
@click.option("--one-profile", is_flag=True, help="One profile for prefill and decode instead of two.")
@click.option("--dry-run", is_flag=True, help="Print the build plan and run the pre-flight; needs no TensorRT.")
@click.option("--force", is_flag=True, help="Replace an existing engine folder.")
def build_cmd(onnx_dir: Path, output: Path | None, max_batch: int, max_seq: int | None, max_context: int | None,
              target: str,
              timing_cache: Path | None, workspace_gib: float, opt_level: int, one_profile: bool, dry_run: bool,
              force: bool) -> None:
    """Build a TensorRT 11 engine (strongly typed) from an export folder."""
    options = BuildOptions(max_batch=max_batch, max_seq=max_seq, max_context=max_context, target=target,
                           workspace_gib=workspace_gib, opt_level=opt_level,
                           timing_cache=str(timing_cache) if timing_cache else None)
    plan = make_plan(onnx_dir, options, two_profiles=not one_profile)
    source_name = ExportFolder(onnx_dir).manifest.source_name or onnx_dir.parent.name
    output = output or Path("engines") / spec_name(source_name) / plan.precision / target
    click.echo(describe_plan(plan))
    if plan.preflight:
        raise AiraOptError(f"pre-flight found {len(plan.preflight)} problem(s); not building")
    if dry_run:
        click.echo(f"dry run: would write {output}/model.plan and model.json")
        return
    record = build_engine(plan, onnx_dir, output, force=force).record
    click.echo(f"wrote {output} (TensorRT {record.tensorrt_version}, {record.gpu}, "
               f"hardware compatibility {record.hardware_compatibility_level}, {record.build_seconds}s)")
    if record.hardware_compatibility_level == "AMPERE_PLUS":
        click.echo("note: AMPERE_PLUS plans use only kernels every Ampere+ GPU has; expect them to run slower "
                   "than a native build on the A100 itself")


# check -------------------------------------------------------------------------------------------------
@main.command("check")
@onnx_dir_option
@engine_dir_option
@click.option("--model", "model_spec", default=None, metavar="SPEC",
              help="PyTorch baseline [default: the export's source model from its manifest].")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="Questions, one per line [default: 8 built-in Aira questions, or 16 chat questions for other "
                   "prompt formats].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@json_option("the report")
@provider_option
@threads_option
@click.option("--baseline", type=click.Choice(BASELINES), default="cpu-fp32", show_default=True,
              help="The PyTorch reference: fp32 on the CPU, or fp16 on the GPU (what GPU users run).")
@speculation_options
def check_cmd(onnx_dir: Path | None, engine_dir: Path | None, model_spec: str | None, prompts_file: Path | None,
              max_new_tokens: int, json_target: str | None, provider: str, threads: int | None, baseline: str,
              speculative: str | None, draft_dir: Path | None, num_speculative_tokens: int | None) -> None:
    """Check an export's outputs against the PyTorch baseline; exit 1 when it fails its thresholds."""
    report = check_folder(chosen_folder(onnx_dir, engine_dir), model_spec, prompts_file, max_new_tokens, provider,
                          threads, baseline, speculation=speculation_from(speculative, num_speculative_tokens,
                                                                          draft_dir is not None),
                          draft=draft_dir, shared_threads=True)
    data = report.to_json()
    if json_target is not None:
        emit_json(json_target, data)
    out = human_echo(json_target)
    out(report_table(report))
    if report.speculation:
        out(f"speculation ({report.speculation['method']}): {report.speculation['accepted']} of "
            f"{report.speculation['proposed']} proposals accepted")
    out(f"\nprecision {report.precision}: greedy identical {report.greedy_exact_match}/{report.prompts}, "
        f"top-1 agreement {report.top1_agreement:.4f}, max |logit diff| {report.max_abs_logit_diff:.3e}, "
        f"min cosine {report.min_cosine:.6f}, perplexity torch {report.perplexity_torch:.4f} "
        f"onnx {report.perplexity_onnx:.4f}")
    if report.passed:
        out("PASSED")
        return
    for failure in report.failures:
        out(f"FAILED: {failure}")
    raise SystemExit(1)


# bench -------------------------------------------------------------------------------------------------
MAX_BENCH_BATCH = 1024  # a bound on what one bench setting may allocate, far past any batch worth timing


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers") from None
    if not items or any(v < 1 for v in items):
        raise click.BadParameter("give one or more positive integers, e.g. 64,512")
    if param.name == "batch_sizes" and max(items) > MAX_BENCH_BATCH:
        raise click.BadParameter(f"batch sizes above {MAX_BENCH_BATCH} are not benchmarked")
    return items


@main.command("bench")
@model_option
@num_layers_option
@click.option("--onnx", "onnx_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Export folder(s) for the ort and optimum backends (repeatable) [default: export/<model>/fp32].")
@click.option("--engine", "engines", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="TensorRT engine(s) for the trt backend (needs TensorRT and a GPU).")
@click.option("--genai", "genai_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder(s) built by onnxruntime-genai's model builder (benchmarks/build_genai.sh), repeatable.")
@click.option("--gguf", "gguf_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="GGUF file(s) for the llamacpp backend (benchmarks/make_gguf.py), repeatable.")
@click.option("--backends", default=",".join(RUNNERS), show_default=True,
              help=f"Comma-separated subset of {', '.join(RUNNERS)}.")
@click.option("--prompt-lengths", default="64", show_default=True, callback=_int_list)
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--batch-sizes", default="1", show_default=True, callback=_int_list)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@threads_option
@provider_option
@json_option("the results")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--optimum-python", type=click.Path(exists=True, dir_okay=False), default=None,
              envvar="AIRA_OPT_OPTIMUM_PYTHON",
              help="The python of a virtual environment with `aira-opt[optimum]` (transformers 4.57), which runs the "
                   "optimum backend [default: this environment, when optimum imports here].")
@openvino_options
@speculation_options
def bench_cmd(model_spec: str, num_layers: int | None, onnx_dirs: tuple[Path, ...], engines: tuple[Path, ...],
              genai_dirs: tuple[Path, ...], gguf_files: tuple[Path, ...], backends: str, prompt_lengths: list[int],
              new_tokens: int, batch_sizes: list[int], warmup: int, repeats: int, threads: int | None, provider: str,
              json_target: str | None, markdown_path: Path | None, plot_path: Path | None,
              optimum_python: str | None, openvino_dirs: tuple[Path, ...], openvino_python: str | None,
              speculative: str | None, draft_dir: Path | None, num_speculative_tokens: int | None) -> None:
    """Time to first token, decode speed and memory of PyTorch, our loop and the peers, side by side. With
    speculation, each export gets a second `ort` row that speculates (with its acceptance)."""
    wanted = [b.strip() for b in backends.split(",") if b.strip()]
    speculation = speculation_from(speculative, num_speculative_tokens, draft_dir is not None)
    sources = BenchSources(model_spec, num_layers, list(onnx_dirs), list(engines), list(genai_dirs), list(gguf_files),
                           provider, optimum_python, speculative=speculation.method if speculation else None,
                           draft_dir=draft_dir, num_speculative_tokens=num_speculative_tokens,
                           openvino_dirs=list(openvino_dirs), openvino_python=openvino_python)
    settings = [Setting(b, p, new_tokens) for b in batch_sizes for p in prompt_lengths]
    report = bench(sources, wanted, settings, warmup, repeats, threads, progress=lambda s: click.echo(s, err=True))
    command = "aira-opt " + " ".join(sys.argv[1:]) if sys.argv and "aira-opt" in sys.argv[0] else ""
    human_echo(json_target)(render_text(report))
    if json_target is not None:
        emit_json(json_target, report_json(report, command))
    write_outputs(report, markdown_path, plot_path, command)


# triton-repo / serve --------------------------------------------------------------------------------------
def serving_options(func: Any) -> Any:
    """The options `triton-repo` and `serve` share: the model's name, batching, instances and runtime."""
    for option in reversed([
        onnx_dir_option, engine_dir_option,
        click.option("--name", default=None, help="Triton model name [default: the source model's, e.g. aira-tiny]."),
        click.option("--max-batch-size", type=click.IntRange(1, 256), default=ServingOptions.max_batch_size,
                     show_default=True, help="Most requests Triton's dynamic batcher puts in one batch."),
        click.option("--queue-delay-us", type=click.IntRange(min=0), default=ServingOptions.queue_delay_us,
                     show_default=True, help="How long a batch waits for more requests to join it."),
        click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="Model instances (each holds its own copy of the weights)."),
        provider_option, threads_option,
    ]):
        func = option(func)
    return func


@main.command("triton-repo")
@serving_options
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("triton"), show_default=True,
              help="The model repository; the model goes in OUTPUT/<name>/.")
@click.option("--force", is_flag=True, help="Replace the model if the repository already has it.")
def triton_repo_cmd(onnx_dir: Path | None, engine_dir: Path | None, name: str | None, max_batch_size: int,
                    queue_delay_us: int, instances: int, provider: str, threads: int | None, output: Path,
                    force: bool) -> None:
    """Write a Triton Inference Server model repository that serves an export (or engine) with our loop."""
    folder = chosen_folder(onnx_dir, engine_dir)
    options = ServingOptions(max_batch_size, queue_delay_us, instances, provider, threads)
    model = write_repository(folder, output, name, options, force=force)
    click.echo(f"wrote {model} (config.pbtxt, {model.name}/1/model.py, the folder at 1/model/)" "\n"
               f"run it: tritonserver --model-repository {output}   (or: aira-opt serve --{folder.kind} {folder.path})")


@main.command("serve")
@serving_options
@click.option("--http-port", type=click.IntRange(1, 65535), default=Ports.http, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=Ports.grpc, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=Ports.metrics, show_default=True)
@click.option("--host", default=LOCAL_HOST, show_default=True,
              help="The address to listen on (HTTP, gRPC, metrics): this machine only by default; 0.0.0.0 opens it "
                   "to the network.")
@click.option("--tritonserver", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A tritonserver binary [default: nvidia-pytriton's, else the one on PATH].")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keep the server's log here [default: a temporary file, removed at exit].")
def serve_cmd(onnx_dir: Path | None, engine_dir: Path | None, name: str | None, max_batch_size: int,
              queue_delay_us: int, instances: int, provider: str, threads: int | None, http_port: int,
              grpc_port: int, metrics_port: int, host: str, tritonserver: Path | None, log_path: Path | None) -> None:
    """Serve an export on Triton Inference Server (HTTP, gRPC, metrics) until Ctrl-C or SIGTERM."""
    folder = chosen_folder(onnx_dir, engine_dir)
    options = ServingOptions(max_batch_size, queue_delay_us, instances, provider, threads)
    serve_folder(folder, name, options, Ports(http_port, grpc_port, metrics_port),
                 lambda line: click.echo(line, err=False), tritonserver, log_path, host=host)


@main.command("web")
@click.option("--onnx", "onnx_dirs", required=True, multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An export folder; repeat it to offer several (fp32 and int4, say) in the page's menu.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--host", default=LOCAL_HOST, show_default=True,
              help="The address to listen on: this machine only by default.")
@click.option("--threads", type=click.IntRange(1, 64), default=1, show_default=True,
              help="WebAssembly threads; above 1 the page is served cross-origin isolated (COOP/COEP), which "
                   "multi-threaded WebAssembly needs.")
@click.option("--save", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Instead of serving, write the one export's transformers.js layout here (onnx/model{suffix}.onnx, "
                   "config.json with transformers.js_config; weights hard-linked) and exit.")
@click.option("--force", is_flag=True, help="With --save: replace an existing folder.")
def web_cmd(onnx_dirs: tuple[Path, ...], port: int, host: str, threads: int, save: Path | None, force: bool) -> None:
    """Serve a chat page that runs the export in the browser (onnxruntime-web and transformers.js), from localhost."""
    if save is not None:
        if len(onnx_dirs) != 1:
            raise click.UsageError("--save writes one export: pass one --onnx")
        click.echo(f"wrote {api.save_web(onnx_dirs[0], save, force=force)} in transformers.js's layout")
        return
    server = api.serve_web(onnx_dirs, host=host, port=port, threads=threads, on_progress=print_progress)
    n = len(onnx_dirs)
    click.echo(f"serving {n} model{'s' if n > 1 else ''} at {server.url}  (Ctrl-C stops)")
    server.serve_forever()


@main.command("eval")
@click.option("--onnx", "onnx_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An export folder of ours (repeat for several).")
@click.option("--gguf", "gguf_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A GGUF file, run by llama.cpp (repeat for several).")
@click.option("--genai", "genai_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An onnxruntime-genai folder, run by onnxruntime-genai (repeat for several).")
@openvino_options
@click.option("--model", "model_spec", default=None, metavar="SPEC",
              help="The source model, the fp32 PyTorch reference [default: the first --onnx folder's source].")
@click.option("--corpus", type=click.Choice(CORPORA), default=CORPORA[0], show_default=True,
              help="Held-out real text (`small`: its first few thousand characters, for quick runs).")
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, help="Score only the corpus's first N tokens.")
@threads_option
@json_option("the report")
def eval_cmd(onnx_dirs: tuple[Path, ...], gguf_files: tuple[Path, ...], genai_dirs: tuple[Path, ...],
             openvino_dirs: tuple[Path, ...], openvino_python: str | None, model_spec: str | None, corpus: str,
             window: int, stride: int, max_tokens: int | None, threads: int | None, json_target: str | None) -> None:
    """Quality on real text against PyTorch fp32: perplexity, KL divergence and top-1 agreement, the same token ids
    for every format (our exports, GGUF through llama.cpp, onnxruntime-genai folders, OpenVINO IR folders)."""
    report = api.evaluate(onnx=onnx_dirs, gguf=gguf_files, genai=genai_dirs, openvino=openvino_dirs,
                          openvino_python=openvino_python, model=model_spec, corpus=corpus,
                          window=window, stride=stride, max_tokens=max_tokens, threads=threads,
                          quiet=json_target == "-", on_skip=lambda line: click.echo(line, err=True))
    if json_target is not None:
        emit_json(json_target, report)
    if json_target != "-":
        headers, rows = eval_table(report)
        click.echo(text_table(headers, rows))


# inspect -----------------------------------------------------------------------------------------------
@main.command("inspect")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option("the summary")
def inspect_cmd(folder: Path, json_target: str | None) -> None:
    """Print an export's contract and manifest (or an engine's sidecar), and verify every file's sha256."""
    summary, lines = inspect_folder(folder)
    if json_target is not None:
        emit_json(json_target, summary)
    if json_target != "-":  # with the JSON on stdout, it says everything
        click.echo("\n".join(lines))
    if summary["problems"]:
        raise SystemExit(1)


def _terminate(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def run() -> None:
    """Console-script entry: domain errors print one line (Click does that). Ctrl-C, SIGTERM and SIGHUP unwind
    the same way, so every partial artifact is removed, and exit 128 + the signal's number."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    try:
        main(standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        raise SystemExit(128 + signal.SIGINT) from None
    except Terminated as exc:
        click.echo(f"terminated by {signal.Signals(exc.signum).name}; partial files removed", err=True)
        raise SystemExit(128 + exc.signum) from None


__all__ = ["main", "run", "AiraOptError"]
