"""``tlsgate completion SHELL`` and ``tlsgate man``: shell completion and a man page, both from the click tree.

Neither keeps a copy of the command line: completion is click's own protocol (the shell calls ``tlsgate`` back
with ``_TLSGATE_COMPLETE`` set, and click answers from the live command tree), and the man page is rendered
from the same help records ``--help`` prints. A new flag therefore shows up in both without anyone editing them.

Why a small roff writer here rather than click-man: click-man is a build-time generator that walks an installed
distribution's entry points and writes one page per subcommand; we want one page, printable by the installed
command itself (``tlsgate man > tlsgate.1``), with no extra dependency. The roff needed is a few macros.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import click
from click.shell_completion import get_completion_class

from tlsgate import __version__

__all__ = ["SHELLS", "completion", "man", "render_man_page"]

SHELLS = ("bash", "zsh", "fish")
# click derives the variable from the program name; the installed `tlsgate` entry point is named so.
COMPLETE_VAR = "_TLSGATE_COMPLETE"

# Where each shell looks for a completion script it loads by itself, for the help text and docs/install.md.
_INSTALL_HINT = {
    "bash": "tlsgate completion bash > ~/.local/share/bash-completion/completions/tlsgate",
    "zsh": "tlsgate completion zsh > ~/.zfunc/_tlsgate   (with fpath+=~/.zfunc before compinit in ~/.zshrc)",
    "fish": "tlsgate completion fish > ~/.config/fish/completions/tlsgate.fish",
}

# Environment variables the page documents; they are read in cli.py (ENV_FLAGS) and the event loop choice.
_ENVIRONMENT = (
    ("KEYSTORE_PATH", "Default for --keystore (server and client modes), as in ghostunnel."),
    ("CERT_PATH, KEY_PATH", "Defaults for --cert and --key."),
    ("KEYSTORE_PASS", "Default for --storepass: the password itself."),
    ("CACERT_PATH", "Default for --cacert."),
    ("TLSGATE_LOOP", "uvloop or asyncio: overrides --loop auto."),
    (COMPLETE_VAR, "Set by the shell completion scripts of `tlsgate completion`; never set it by hand."),
)


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish).

    \b
    Load it for this shell session:   eval "$(tlsgate completion bash)"
    Or install it once:
      bash: tlsgate completion bash > ~/.local/share/bash-completion/completions/tlsgate
      zsh:  tlsgate completion zsh > ~/.zfunc/_tlsgate   (fpath+=~/.zfunc before compinit)
      fish: tlsgate completion fish > ~/.config/fish/completions/tlsgate.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None  # click.Choice only lets the shells click knows through
    root = click.get_current_context().find_root().command
    click.echo(cls(root, {}, "tlsgate", COMPLETE_VAR).source())


@click.command("man")
def man() -> None:
    """Print the tlsgate(1) man page (roff), built from the same help as --help.

    \b
    Read it now:   tlsgate man | man -l -
    Install it:    tlsgate man > ~/.local/share/man/man1/tlsgate.1
    """
    root = click.get_current_context().find_root().command
    click.echo(render_man_page(root), nl=False)


def render_man_page(root: click.Command, prog: str = "tlsgate") -> str:
    """The whole page for ``root`` and every (non-hidden) command below it, as roff for ``man``.

    One page, one ``.SS`` section per command path (``tlsgate certs issue``), each with its usage line, its help
    text and a ``.TP`` entry per option with exactly the text ``--help`` shows (defaults and choices included).
    """
    # The root's context_settings (-h as well as --help) reach every subcommand's context through parent=.
    root_ctx = click.Context(root, info_name=prog, **root.context_settings)
    summary = (root.help or "").strip().splitlines()[0] if root.help else prog
    summary = summary.removeprefix(f"{prog}: ")
    lines = [
        f'.TH {prog.upper()} 1 "" "{prog} {__version__}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- {_escape(summary)}",
        ".SH SYNOPSIS",
        f".B {prog}",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
        *_paragraphs(root.help or ""),
        ".SH OPTIONS",
        *_options(root, root_ctx),
        ".SH COMMANDS",
    ]
    for path, command, ctx in _walk(root, root_ctx, prog):
        lines.append(f'.SS "{_escape(path)}"')
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += [".nf", f"\\fB{_escape(path)}\\fR {_escape(usage)}", ".fi"]
        lines += _paragraphs(command.help or "")
        lines += _options(command, ctx)
    lines += [".SH ENVIRONMENT"]
    for name, text in _ENVIRONMENT:
        lines += [".TP", f"\\fB{_escape(name)}\\fR", _escape(text)]
    lines += [".SH SHELL COMPLETION"]
    for shell in SHELLS:
        lines += [".TP", f"\\fB{shell}\\fR", _escape(_INSTALL_HINT[shell])]
    lines += [
        ".SH EXIT STATUS",
        "0 on success (and after a clean shutdown); 1 when a shutdown had to cut open connections;",
        "2 for a usage or configuration error, reported as one line on standard error.",
        ".SH SEE ALSO",
        "ghostunnel(1), openssl(1). The documentation pages under docs/ in the source distribution.",
    ]
    return "\n".join(lines) + "\n"


def _walk(command: click.Command, ctx: click.Context, path: str) -> Iterator[tuple[str, click.Command, click.Context]]:
    """Every command below ``command``, depth first, in the order ``--help`` lists them."""
    if not isinstance(command, click.Group):
        return
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or sub.hidden:
            continue
        sub_ctx = click.Context(sub, info_name=name, parent=ctx)
        sub_path = f"{path} {name}"
        yield sub_path, sub, sub_ctx
        yield from _walk(sub, sub_ctx, sub_path)


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    lines: list[str] = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, text = record
        lines += [".TP", _bold_flags(names), _escape(text) if text else ""]
    return lines


def _paragraphs(text: str) -> list[str]:
    """Help text as roff paragraphs; click's ``\\b`` blocks (kept as typed) become no-fill blocks."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", click.unstyle(text).strip()):
        if not block.strip():
            continue
        raw = block.splitlines()
        if raw[0].strip() == "\b":
            out += [".PP", ".nf", *(_escape(line) for line in raw[1:]), ".fi"]
        else:
            out += [".PP", _escape(" ".join(line.strip() for line in raw))]
    return out


def _bold_flags(names: str) -> str:
    """``-h, --help`` and ``--listen ADDR`` as roff: each flag bold, a metavar after it in italics."""
    rendered = []
    for segment in re.split(r", | / ", names):
        flag, _, metavar = segment.partition(" ")
        rendered.append(f"\\fB{_escape(flag)}\\fR" + (f" \\fI{_escape(metavar)}\\fR" if metavar else ""))
    return ", ".join(rendered)


def _escape(text: str) -> str:
    """Text as roff takes it literally: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text
