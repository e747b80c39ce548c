"""The `hlwq-gguf` command line: one module per verb, each a thin layer over an importable function."""
from __future__ import annotations

import signal

import click

from . import bench as bench_cmd
from . import build as build_cmd
from . import convert as convert_cmd
from . import demo as demo_cmd
from . import dump as dump_cmd
from . import kv_calibrate as kv_calibrate_cmd
from . import plan as plan_cmd
from . import run as run_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hlwq-gguf")
def main() -> None:
    """HLWQ (Hadamard-Lloyd weight quantization) for GGUF and llama.cpp."""
    # SIGTERM unwinds like Ctrl-C, so a killed conversion still removes its temporary files
    signal.signal(signal.SIGTERM, _exit_on_signal)


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


main.add_command(bench_cmd.bench)
main.add_command(build_cmd.build)
main.add_command(convert_cmd.convert)
main.add_command(demo_cmd.demo)
main.add_command(dump_cmd.dump_command)
main.add_command(kv_calibrate_cmd.kv_calibrate)
main.add_command(plan_cmd.plan)
main.add_command(run_cmd.run)
main.add_command(run_cmd.chat)
