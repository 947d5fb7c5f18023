"""The ``svd-serve`` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import SvdServeError
from .methods import METHODS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="svd-serve")
def cli():
    """Train SVD-family adapters, fold them, and export them as exact LoRA for serving."""


@cli.command("methods")
def methods_cmd():
    """List the adapter methods and the paper each follows."""
    for name, cls in METHODS.items():
        click.echo(f"{name:10s} {cls.paper}")


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="Hugging Face model directory.")
@click.option("--data", required=True, type=click.Path(), help='JSONL: {"text"}, {"prompt","completion"} or {"messages"}.')
@click.option("--method", default="kasa", show_default=True, type=click.Choice(list(METHODS)))
@click.option("--rank", type=int, help="Adapter rank r (default: the method's).")
@click.option("--alpha", type=float, help="LoRA alpha; scale = alpha / r (default: the method's).")
@click.option("--targets", default="q_proj,v_proj", show_default=True,
              help="Module-name suffixes (comma list), 'all-linear', or a regex over full names.")
@click.option("--steps", type=int, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, help="Epochs over the data (instead of --steps).")
@click.option("--lr", default=4e-4, show_default=True, type=float)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--max-length", default=512, show_default=True, type=int, help="Longer rows are truncated (and counted).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--calib-data", type=click.Path(), help="JSONL for CorDA/KORE input covariances.")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="A method option, e.g. -o beta=1e-4 (see `svd-serve methods`).")
@click.option("--out", required=True, type=click.Path(), help="Output adapter directory.")
def train(base, data, method, rank, alpha, targets, steps, epochs, lr, batch_size, max_length, seed,
          calib_data, options, out):
    """Train an adapter on a base model; the method's regularizers are added automatically."""
    from .adapter import parse_option_values
    from .train import TrainConfig
    from .train import train as run

    cfg = TrainConfig(base=base, data=data, out=out, method=method, rank=rank, alpha=alpha,
                      targets=targets, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                      max_length=max_length, seed=seed, calib_data=calib_data,
                      options=parse_option_values(method, list(options)))
    click.echo(f"adapter written to {run(cfg)}")


@cli.command()
@click.option("--base", required=True, type=click.Path(), help="The base the adapter was trained on.")
@click.option("--adapter", required=True, type=click.Path(), help="svd-serve adapter directory.")
@click.option("--out", required=True, type=click.Path(), help="Output HF checkpoint directory.")
def fold(base, adapter, out):
    """Fold an adapter into the base: a standalone HF checkpoint in the base's dtype."""
    from .fold import fold as run

    click.echo(f"folded checkpoint written to {run(base, adapter, out)}")


@cli.command()
@click.option("--target", required=True, type=click.Choice(["peft", "vllm", "onnx"]))
@click.option("--base", required=True, type=click.Path())
@click.option("--adapter", "adapters", required=True, multiple=True, type=click.Path(),
              help="svd-serve adapter directory (repeat for several).")
@click.option("--out", required=True, type=click.Path())
@click.option("--max-rank", type=int, help="Best rank-K approximation instead of the exact rank (error reported).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None, help="ONNX graph dtype.")
@click.option("--no-verify", is_flag=True, help="Skip the numerical check of the written adapter.")
def export(target, base, adapters, out, max_rank, dtype, no_verify):
    """Export adapters as exact LoRA against the unmodified base."""
    from .export import export as run

    extra = {"dtype": dtype} if dtype else {}
    report = run(target, base, list(adapters), out, max_rank=max_rank, verify=not no_verify, **extra)
    for name, entry in report["adapters"].items():
        err = entry["max_rel_error"]
        line = f"{name}: rank {entry['rank']} (bound {entry['bound']}), {entry['modules']} modules, "
        line += "exact" if err == 0 else f"max relative error {err:.3e}"
        if "max_logit_gap" in entry:
            line += f", logits vs adapted model: max |Δ| {entry['max_logit_gap']:.2e}"
        click.echo(line)
    for line in report.get("messages", []):
        click.echo(line)
    click.echo(f"written to {out}")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="svd-serve", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SvdServeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # never a traceback for users; SVD_SERVE_DEBUG=1 shows it
        if os.environ.get("SVD_SERVE_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        click.echo(f"error: {type(e).__name__}: {msg} (set SVD_SERVE_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
