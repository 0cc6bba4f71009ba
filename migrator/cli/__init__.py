"""The ``migrator`` command line (also ``python -m migrator``)."""

from __future__ import annotations

import typer

from migrator.cli.admin import approvals_app, jobs_app
from migrator.cli.common import state
from migrator.cli.dbcmd import db_app
from migrator.cli.files import atc_command, transfer_command
from migrator.cli.help import App
from migrator.cli.lineage import lineage_command
from migrator.cli.service import health_command, plan_command, run_command, tick_command

__all__ = ["app", "main"]

app = App(
    name="migrator",
    help=(
        "LoRA-X Migrator: carries LoRA-X adapters to new base-model versions in an MLflow "
        "Model Registry, training-free. Exit codes: 0 success, 1 failure of the work, "
        "2 bad usage or bad input."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global(
    config: str | None = typer.Option(
        None, "--config", "-c", envvar="MIGRATOR_CONFIG", help="TOML settings file."
    ),
    log_level: str | None = typer.Option(None, "--log-level", help="DEBUG, INFO, WARNING..."),
) -> None:
    state.config = config
    state.log_level = log_level
    state._settings = None


app.command("atc")(atc_command)
app.command("transfer")(transfer_command)
app.command("tick")(tick_command)
app.command("run")(run_command)
app.command("plan")(plan_command)
app.command("health")(health_command)
app.command("lineage")(lineage_command)
app.add_typer(approvals_app, name="approvals")
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")


def main() -> None:
    app()
