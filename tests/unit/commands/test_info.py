import json

from click.testing import CliRunner

from cxrdist.cli import main


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "info" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output


def test_info_reports_stack_and_devices():
    result = CliRunner().invoke(main, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["packages"]["torch"] != "not installed"
    assert "cuda" in data["devices"]
    assert data["bitsandbytes"].startswith(("usable", "not usable"))
