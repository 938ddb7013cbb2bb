"""The `lorafit` command. It only wires stages together; torch and transformers are imported inside commands."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import typer

from lorafit.errors import LorafitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune Llama 3.x (and other Llama-architecture models) with LoRA / QLoRA on your own data.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data.")
app.add_typer(data_app, name="data")
STATE = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks and library warnings.")):
    STATE["debug"] = debug
    _setup_logging(debug)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("lorafit").setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for noisy in ("transformers", "datasets", "peft", "accelerate", "torch", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        import warnings

        warnings.filterwarnings("ignore")


@app.command()
def train(
    config: str = typer.Argument(..., help="Run config YAML (see configs/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Field overrides, e.g. training.learning_rate=1e-4 lora.r=8."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint of this run."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar (for logs)."),
):
    """Fine-tune a LoRA adapter as CONFIG says; writes runs/<name>/."""
    from lorafit.config import load_config
    from lorafit.train import run_training

    cfg = load_config(config, overrides or [])
    run_training(cfg, resume=resume, quiet=quiet)


@app.command()
def chat(
    target: str = typer.Argument(..., help="Run directory, merged model folder, or GGUF file."),
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
):
    """Multi-turn streaming chat (/reset, /system TEXT, /exit)."""
    from lorafit.chat import chat as run_chat

    run_chat(target, system=system, max_new_tokens=max_new_tokens)


@app.command()
def demo(
    config: str = typer.Option("configs/demo.yaml", "--config", help="Demo config."),
    heldout: str = typer.Option("examples/heldout.jsonl", "--heldout", help="Held-out questions with the key fact of each answer."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Field overrides."),
):
    """Fine-tune the embedded SmolLM2 on examples/ and compare base vs tuned answers on held-out questions."""
    from lorafit.demo import run_demo

    raise typer.Exit(run_demo(config, heldout, overrides or []))


@app.command("config-reference")
def config_reference():
    """Print every config field with its default and meaning (Markdown)."""
    from lorafit.config import reference

    print(reference())


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app()
    except LorafitError as err:
        if debug:
            raise
        from rich.console import Console

        console = Console(stderr=True, highlight=False, soft_wrap=True)
        console.print(f"[bold red]error:[/] {err.message}", markup=True)
        if err.hint:
            console.print(err.hint, markup=False)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # a bug of ours or a library's: short message, traceback with --debug
        if debug:
            raise
        print(f"error: unexpected {type(err).__name__}: {err}\nRun again with --debug for the traceback, "
              "and please report it.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
