"""``hotsite unit``: the systemd unit that runs a configuration (appliance/systemd_unit.py)."""

from __future__ import annotations

from pathlib import Path

import click

from appliance import config as config_mod
from appliance import systemd_unit
from appliance.cli.context import Context, fail, pass_ctx
from appliance.errors import ConfigError


@click.group()
def unit() -> None:
    """The daemon's systemd unit, made from its configuration."""


@unit.command("render")
@click.option(
    "--venv",
    default=str(systemd_unit.DEFAULT_VENV),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The virtualenv ExecStart= runs hotsite from.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the unit here instead of to standard output.",
)
@pass_ctx
def render(ctx: Context, venv: Path, output: Path | None) -> None:
    """Print the unit that runs the --config file under the tightest sandbox it allows.

    \b
    ReadWritePaths= for every path the configuration writes, DeviceAllow= for
    its modem, the address families and capabilities its actuators and probes
    need; nothing else. Exit 2 if the configuration is invalid.
    \b
    Example:
      hotsite --config /etc/hotsite/hotsite.toml unit render -o /etc/systemd/system/hotsite.service
    """
    path = ctx.config_path
    try:
        cfg = config_mod.load(path)
    except ConfigError as exc:
        fail(exc)
    text = systemd_unit.render(cfg, config_path=path.absolute(), venv=venv)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
