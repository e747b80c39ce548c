"""`hlwq-gguf run` and `hlwq-gguf chat`: generate from an HLWQ (or any) GGUF through the patched llama.cpp."""
from __future__ import annotations

import sys

import click

from hlwq_gguf import generate, plan, runtime


def _model_options(command):
    for option in reversed([
        click.argument("model", type=click.Path(exists=True, dir_okay=False)),
        click.option("--ctx", "n_ctx", type=int, default=4096, show_default=True, help="Context size (tokens)."),
        click.option("--vram", default=None, help="GPU memory budget (e.g. 24GiB): plan which MoE experts stay in RAM."),
        click.option("--kv", "kv_type", type=click.Choice(list(plan.KV_TYPES), case_sensitive=False), default=None,
                     help="KV-cache type for K and V (default f16); with hlwq3 K is hlwq4 (a 3-bit K costs 3-4x the "
                          "KL divergence), and with an HLWQ K, K stays q8_0 in the layers whose key bias a low-bit "
                          "code would wreck; a line says so."),
        click.option("--kv-k", "kv_type_k", type=click.Choice(list(plan.KV_TYPES), case_sensitive=False), default=None,
                     help="K's type as given, in every layer (overrides --kv)."),
        click.option("--kv-v", "kv_type_v", type=click.Choice(list(plan.KV_TYPES), case_sensitive=False), default=None,
                     help="V's type (overrides --kv)."),
        click.option("-ot", "--override-tensor", "overrides", multiple=True,
                     help="REGEX=DEVICE tensor buffer override, as llama.cpp's -ot."),
        click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)."),
        click.option("--temp", "temperature", type=float, default=generate.Sampling.temperature, show_default=True),
        click.option("--top-k", type=int, default=generate.Sampling.top_k, show_default=True),
        click.option("--top-p", type=float, default=generate.Sampling.top_p, show_default=True),
        click.option("--min-p", type=float, default=generate.Sampling.min_p, show_default=True),
        click.option("--repeat-penalty", type=float, default=generate.Sampling.repeat_penalty, show_default=True,
                     help="1.0 = off, as in llama.cpp."),
        click.option("--seed", type=int, default=None, help="Sampling seed (default: random)."),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log (placement, buffer sizes)."),
    ]):
        command = option(command)
    return command


def _open(model, n_ctx, vram, kv_type, kv_type_k, kv_type_v, overrides, threads, verbose, temperature, top_k, top_p,
          min_p, repeat_penalty, seed):
    """The model and sampling settings that _model_options describe, with their errors as one-line messages."""
    try:
        llm = runtime.open_model(model, n_ctx=n_ctx, n_threads=threads, verbose=verbose, vram=vram, kv_type=kv_type,
                                 kv_type_k=kv_type_k, kv_type_v=kv_type_v, overrides=list(overrides) or None)
    except (plan.PlanError, runtime.OverrideError) as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise click.ClickException(f"{model}: {e}") from None
    if llm.kv_note:
        click.echo(f"hlwq-gguf: {llm.kv_note}", err=True)
    if llm.placement_plan is not None and verbose:
        click.echo(llm.placement_plan.table(), err=True)
    return llm, generate.Sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed)


@click.command(name="run")
@_model_options
@click.option("-p", "--prompt", required=True, help="The text to continue.")
@click.option("-n", "--n-predict", type=int, default=256, show_default=True, help="Tokens to generate at most.")
def run(prompt, n_predict, **model_options) -> None:
    """Continue PROMPT with MODEL, streaming the tokens as they come."""
    llm, sampling = _open(**model_options)
    for piece in generate.stream_completion(llm, prompt, n_predict, sampling):
        click.echo(piece, nl=False)
    click.echo()


@click.command(name="chat")
@_model_options
@click.option("-s", "--system", default=None, help="System message.")
@click.option("-n", "--n-predict", type=int, default=1024, show_default=True, help="Tokens per reply at most.")
def chat(system, n_predict, **model_options) -> None:
    """Chat with MODEL using the chat template stored in the GGUF; one user turn per input line, /exit or EOF ends."""
    llm, sampling = _open(**model_options)
    interactive = sys.stdin.isatty()

    def user_turns():
        while True:
            if interactive:
                click.echo("> ", nl=False)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return
            if line.strip():
                yield line.rstrip("\n")

    turn = None
    for index, piece in generate.chat_session(llm, user_turns(), system, n_predict, sampling):
        if turn is not None and index != turn:
            click.echo()
        turn = index
        click.echo(piece, nl=False)
    if turn is not None:
        click.echo()
