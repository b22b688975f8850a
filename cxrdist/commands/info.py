"""`cxrdist info`: versions of the stack, devices, and which optional parts can run here."""
from __future__ import annotations

import json

import click

from cxrdist.cli_options import friendly_errors


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@friendly_errors
def info(as_json: bool) -> None:
    """Print versions of the stack, devices seen (CUDA / MPS / CPU), bf16, bitsandbytes and DeepSpeed."""
    from cxrdist.env_info import collect
    from cxrdist.logging_utils import quiet_dependencies

    quiet_dependencies()
    data = collect()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"python        {data['python']}")
    for name, version in data["packages"].items():
        click.echo(f"{name:<13} {version}")
    for key, value in data["devices"].items():
        click.echo(f"{key:<13} {value}")
    click.echo(f"bitsandbytes  {data['bitsandbytes']}")
    click.echo(f"deepspeed     {data['deepspeed']}")
