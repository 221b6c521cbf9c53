"""The ``curvinf`` command. Each sub-command lives in the module that does its work;
this file only wires them into one typer app."""

from __future__ import annotations

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Influence functions with a measurable ladder of curvature approximations.",
)


@app.command()
def demo(
    depth: int = typer.Option(2, help="hidden layers"),
    width: int = typer.Option(32, help="hidden units per layer"),
    epochs: int = typer.Option(50, help="training epochs"),
    seed: int = typer.Option(0, help="seed for split, init and batches"),
) -> None:
    """Train an MLP on UCI digits, score with every rung, print how the rungs agree."""
    from curvinf.demo import run_demo

    run_demo(depth=depth, width=width, epochs=epochs, seed=seed)


if __name__ == "__main__":  # pragma: no cover
    app()
