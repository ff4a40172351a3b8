"""``uartbridge.1``, the man page, generated from the argument parser (``cli.build_parser``).

    python -m uartbridge.manpage > docs/uartbridge.1

A test checks that ``docs/uartbridge.1`` is what this prints, so the page cannot drift from
the parser. Plain man(7) macros only.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .cli import COMMANDS, DESCRIPTION, EXIT_STATUS, build_parser

FILES = """\
.TP
.I /etc/uartbridge/uartbridge.toml
the config of the single service (uartbridge.service), and the default of run, resume
and check-config when it exists
.TP
.I /etc/uartbridge/NAME.toml
the config of instance NAME (uartbridge@NAME.service); its directories are
/run/uartbridge-NAME and /var/lib/uartbridge-NAME
.TP
.I /run/uartbridge[-NAME]/
runtime directory: control.sock, UART.bus, UART.pty, emergency/ (checkpoints the state
directory refused)
.TP
.I /var/lib/uartbridge[-NAME]/
state directory: UART.checkpoint.json, UART.checkpoint.prev.json, daemon.lock,
daemon.running
"""


def _escape(text: str) -> str:
    """Text safe in a roff line: backslashes, leading dots and quotes, dashes."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _option(action: argparse.Action) -> str:
    if action.option_strings:
        names = ", ".join(f"\\fB{_escape(o)}\\fR" for o in action.option_strings)
        if action.nargs == 0:
            return names
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest
        )
        return f"{names} \\fI{_escape(str(metavar))}\\fR"
    return f"\\fI{_escape(str(action.metavar or action.dest))}\\fR"


def _synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    parts = [f"\\fBuartbridge {name}\\fR"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = _option(action)
        optional = bool(action.option_strings) or action.nargs == "?"
        parts.append(f"[{text}]" if optional else text)
    return " ".join(parts)


def _examples(epilog: str) -> str:
    lines = [line.strip() for line in epilog.splitlines()[1:] if line.strip()]
    return "\n".join(f".nf\n{_escape(line)}\n.fi" for line in lines)


def render() -> str:
    """The whole man page as roff text."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = [
        f'.TH UARTBRIDGE 1 "" "uartbridge {__version__}" "User Commands"',
        ".SH NAME",
        f"uartbridge \\- {_escape(DESCRIPTION[0].lower() + DESCRIPTION[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
        "\\fBuartbridge\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _escape(DESCRIPTION),
        "Each command is described below; \\fBuartbridge\\fR \\fICOMMAND\\fR \\fB\\-\\-help\\fR "
        "prints the same.",
        ".SH COMMANDS",
    ]
    for name, help_text, description, epilog in COMMANDS:
        command = sub.choices[name]
        out += [
            f".SS {name}",
            _synopsis(name, command),
            ".PP",
            _escape(help_text[0].upper() + help_text[1:]) + ". " + _escape(description),
        ]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out += [".TP", _option(action), _escape(action.help or "")]
        out += [".PP", "Examples:", _examples(epilog)]
    status_lines = EXIT_STATUS.splitlines()[1:]
    out += [".SH EXIT STATUS", ".nf", _escape("\n".join(s.strip() for s in status_lines)), ".fi"]
    out += [".SH FILES", FILES.rstrip("\n")]
    out += [
        ".SH SEE ALSO",
        "\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \\fBpicocom\\fR(1), \\fBsocat\\fR(1);"
        " README.md and docs/ in the source tree",
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    """Print the man page."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
