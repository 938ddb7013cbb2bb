"""The `lorafit` command. It only wires stages together; torch and transformers are imported inside commands."""

from __future__ import annotations

import logging
import os
import sys

import typer

from lorafit.errors import LorafitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune Llama 3.x (and other Llama-architecture models) with LoRA / QLoRA on your own data.",
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data.")
app.add_typer(data_app, name="data")


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks and library warnings.")):
    _setup_logging(debug)


def _setup_logging(debug: bool) -> None:
    from lorafit.redact import install_log_redaction

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    install_log_redaction()  # no token in any log line, ours or a library's
    logging.getLogger("lorafit").setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars read this too
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        for noisy in ("transformers", "datasets", "peft", "accelerate", "torch", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")


@app.command()
def train(
    config: str = typer.Argument(..., help="Run config YAML (see configs/)."),
    overrides: list[str] | None = typer.Argument(
        None, help="Field overrides, e.g. training.learning_rate=1e-4 lora.r=8."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint of this run."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar (for logs)."),
):
    """Fine-tune a LoRA adapter as CONFIG says; writes runs/<name>/."""
    from lorafit.config import load_config

    cfg = load_config(config, overrides or [])  # config errors come before torch is even imported
    from lorafit.train.run import run_training

    run_training(cfg, resume=resume, quiet=quiet)


@app.command()
def chat(
    target: str = typer.Argument(..., help="Run directory, merged model folder, or GGUF file."),
    system: str | None = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; above 0 samples (top-p 0.9)."),
    tools: str | None = typer.Option(None, "--tools", help="JSON file with a list of tool schemas the model may call."),
):
    """Multi-turn streaming chat (/reset, /system TEXT, /exit); with --tools, calls are printed, results pasted."""
    from lorafit.inference.chat import chat as run_chat

    run_chat(target, system=system, max_new_tokens=max_new_tokens, temperature=temperature, tools_file=tools)


@app.command()
def merge(
    run_dir: str = typer.Argument(..., help="Run directory written by `lorafit train`."),
    out: str = typer.Option(
        ..., "--out", help="New folder for the merged model (refused if it exists and is not empty)."
    ),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32."),
):
    """Merge the adapter into its base: a plain model folder for transformers, vLLM or GGUF conversion."""
    from lorafit.export.merge import merge_run

    print(f"merged model written to {merge_run(run_dir, out, dtype)}")


@app.command()
def export(
    source: str = typer.Argument(
        ..., help="Run directory, or a model folder written by `lorafit merge` (gguf, ollama)."
    ),
    out: str = typer.Option(
        ..., "--out", help="gguf: the .gguf file; ollama / vllm: a new folder (refused if it exists and is not empty)."
    ),
    fmt: str = typer.Option(
        "gguf", "--format", help="gguf (llama.cpp), ollama (GGUF + Modelfile) or vllm (adapter + serve command)."
    ),
    outtype: str = typer.Option("f16", "--outtype", help="GGUF weights: f16, bf16 or q8_0."),
):
    """Write the model for llama.cpp (GGUF), Ollama (GGUF + Modelfile) or vLLM (adapter, chat template, command)."""
    from lorafit.errors import ConfigError

    if fmt == "gguf":
        from lorafit.export.gguf import export_gguf

        path = export_gguf(source, out, outtype)
        print(f"GGUF written to {path} ({path.stat().st_size / 2**20:,.1f} MiB)")
    elif fmt == "ollama":
        from lorafit.export.ollama import export_ollama

        folder = export_ollama(source, out, outtype)
        print(
            f"Ollama model written to {folder} (Modelfile + GGUF)\nnext: ollama create NAME -f {folder / 'Modelfile'}"
        )
    elif fmt == "vllm":
        from lorafit.export.vllm import export_vllm

        folder, command = export_vllm(source, out)
        import shlex

        print(f"vLLM files written to {folder}\nserve with ({folder / 'serve.sh'}):\n{shlex.join(command)}")
    else:
        raise ConfigError(
            f"`--format` must be gguf, ollama or vllm, got {fmt!r}.",
            "For safetensors use `lorafit merge RUN_DIR --out DIR`.",
        )


@app.command()
def verify(
    run_dir: str = typer.Argument(..., help="Run directory written by `lorafit train`."),
    gguf: str | None = typer.Option(None, "--gguf", help="GGUF file to check (default: a temporary f16 export)."),
    prompts: str | None = typer.Option(
        None,
        "--prompts",
        help="JSONL (`prompt`, `question` or `messages`) or a text file; default: the run's eval.prompts.",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    min_identical: float | None = typer.Option(
        None, "--min-identical", help="Fraction of answers that must be identical (default 0.9; q8_0 GGUF 0.7)."
    ),
):
    """Same prompts through transformers (base + adapter), the merged model and the GGUF in llama.cpp; exit 1 on disagreement."""
    from lorafit.export.verify import verify as run_verify

    raise typer.Exit(run_verify(run_dir, gguf, prompts, max_new_tokens, min_identical))


@app.command()
def generate(
    target: str = typer.Argument(..., help="Run directory, merged model folder, GGUF file, or smollm2-135m-instruct."),
    prompts: str = typer.Option(
        ..., "--prompts", help="JSONL with `prompt` or `messages` per line, or a text file (one prompt per line)."
    ),
    out: str = typer.Option(..., "--out", help='Output JSONL: {"prompt", "response"} per line.'),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    sample: bool = typer.Option(False, "--sample", help="Sample (temperature, top-p) instead of greedy decoding."),
    temperature: float = typer.Option(0.7, "--temperature"),
    top_p: float = typer.Option(0.9, "--top-p"),
    batch_size: int = typer.Option(8, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    system: str | None = typer.Option(None, "--system", help="System message (default: the run's data.system_prompt)."),
    tools: str | None = typer.Option(
        None, "--tools", help="JSON file with a list of tool schemas, for prompts without their own `tools`."
    ),
):
    """Answer every prompt of a file in batches (left padding), stopping at the end-of-turn token; calls are parsed."""
    from lorafit.inference.generate import generate as run_generate

    path = run_generate(
        target, prompts, out, max_new_tokens, sample, temperature, top_p, batch_size, seed, system, tools_file=tools
    )
    print(f"answers written to {path}")


@app.command()
def compare(
    run_dir: str = typer.Argument(..., help="Run directory written by `lorafit train`."),
    data: str = typer.Option(..., "--data", help="Chat data (JSONL etc.) whose questions both models answer."),
    limit: int = typer.Option(10, "--limit", help="Questions shown side by side (the loss uses every row)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    tool_limit: int = typer.Option(
        200, "--tool-limit", help="Rows with tools scored as tool calls (valid, right tool, exact arguments)."
    ),
    general: bool = typer.Option(
        True, "--general/--no-general", help="Also the loss change on 32 general-knowledge chats shipped with lorafit."
    ),
):
    """Base vs fine-tuned: answers side by side, both losses on the same data, key-fact accuracy of rows with
    `expected`, tool-call accuracy, and the loss change on general-knowledge chats (what was learned, what drifted)."""
    from lorafit.inference.compare import compare as run_compare

    run_compare(
        run_dir,
        data,
        limit=limit,
        max_new_tokens=max_new_tokens,
        as_json=as_json,
        tool_limit=tool_limit,
        general=general,
    )


@app.command()
def plan(
    config: str = typer.Argument(
        ..., help="Run config YAML (the model is built on the meta device: no weights loaded)."
    ),
    overrides: list[str] | None = typer.Argument(None, help="Field overrides, e.g. lora.r=8 model.quantization=4bit."),
    gpu: str | None = typer.Option(
        None, "--gpu", help="GPU to judge for, e.g. 4090, A100-40GB, H100, or a size like 48GB."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object."),
):
    """Exact parameter counts, the LoRA arithmetic and a memory estimate; which GPUs it fits and what would make it fit."""
    from lorafit.plan.planner import plan as run_plan

    run_plan(config, gpu=gpu, as_json=as_json, overrides=overrides or [])


@app.command()
def demo(
    config: str | None = typer.Option(
        None, "--config", help="Demo config (default configs/demo.yaml, with --tools configs/demo_tools.yaml)."
    ),
    heldout: str | None = typer.Option(
        None,
        "--heldout",
        help="Held-out questions (default examples/heldout.jsonl, with --tools examples/tools/heldout.jsonl).",
    ),
    tools: bool = typer.Option(
        False, "--tools", help="The tool-calling demo: teach invented tools, score exact calls base vs tuned."
    ),
    overrides: list[str] | None = typer.Argument(None, help="Field overrides."),
):
    """Fine-tune the embedded SmolLM2 on examples/ and compare base vs tuned answers on held-out questions."""
    if tools:
        from lorafit.demo_tools import TOOL_CONFIG, TOOL_HELDOUT, run_tool_demo

        raise typer.Exit(run_tool_demo(config or TOOL_CONFIG, heldout or TOOL_HELDOUT, overrides or []))
    from lorafit.demo import run_demo

    raise typer.Exit(run_demo(config or "configs/demo.yaml", heldout or "examples/heldout.jsonl", overrides or []))


@data_app.command("check")
def data_check(
    target: str = typer.Argument(..., help="Data file, glob or folder, or a run config YAML."),
    model: str | None = typer.Option(
        None,
        "--model",
        help="Model whose tokenizer and chat template to use (default: the config's, else smollm2-135m-instruct).",
    ),
    max_length: int | None = typer.Option(None, "--max-length", help="Override data.max_length."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
):
    """Validate and measure training data with only the tokenizer loaded; exit 2 if it cannot train."""
    from lorafit.data.check import data_check as run_check

    raise typer.Exit(run_check(target, model, max_length, as_json))


@app.command()
def report(run_dir: str = typer.Argument(..., help="Run directory written by `lorafit train`.")):
    """(Re)build loss.png and the self-contained report.html of a run."""
    from lorafit.report import write_report

    print(write_report(run_dir))


@app.command()
def ui(
    runs: str = typer.Option("runs", "--runs", help="Runs folder to list and watch (where `lorafit train` writes)."),
    port: int = typer.Option(7860, "--port", help="Port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; only change it on a trusted network."),
):
    """Local web app: check data, start and watch runs live (Stop saves a checkpoint), list runs, chat base vs tuned."""
    from lorafit.ui.server import serve

    serve(runs, host=host, port=port)


@app.command("config-reference")
def config_reference():
    """Print every config field with its default and meaning (Markdown)."""
    from lorafit.config_reference import reference

    print(reference())


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app()
    except LorafitError as err:
        if debug:
            raise
        from rich.console import Console
        from rich.markup import escape

        from lorafit.redact import redact

        console = Console(stderr=True, highlight=False, soft_wrap=True)
        # escape: a message quoting user input such as "[/x]" is text, not rich markup (MarkupError otherwise)
        console.print(f"[bold red]error:[/] {escape(redact(err.message))}", markup=True)
        if err.hint:
            console.print(redact(err.hint), markup=False)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # a bug of ours or a library's: short message, traceback with --debug
        if debug:
            raise
        from lorafit.redact import redact

        print(
            f"error: unexpected {type(err).__name__}: {redact(str(err))}\nRun again with --debug for the traceback, "
            "and please report it.",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
