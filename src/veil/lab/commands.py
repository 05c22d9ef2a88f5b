"""The runners of ``veil lab`` subcommands (arguments: :mod:`veil.lab.cli`).

Exit status: 0 when nothing is flagged; 1 when a detector flags a flow (``passive``,
``report``), the prober tells the target apart from its reference or finds a proxy's tells
(``probe``), or two servers share what unrelated sites would not (``installs``). Usage
errors, and a server that cannot be scanned, are the CLI's (2).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
from pathlib import Path

from veil.errors import ConfigError
from veil.lab import passive, probe, report, sameinstall
from veil.lab.bridge import run_bridge
from veil.lab.censor import Censor, Rules
from veil.lab.sni import BlockList


def _emit(text: str) -> None:
    """Write to stdout; a reader that went away (``| head``) is not an error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's advice: point stdout at devnull so the flush at exit does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _read_replay(text: str) -> bytes:
    if text.startswith("@"):
        return Path(text[1:]).read_bytes()
    return bytes.fromhex(text)


def run_lab(args: argparse.Namespace) -> int:
    """Run one ``veil lab`` subcommand; the exit status."""
    if args.lab_command == "passive":
        return _passive(args)
    if args.lab_command == "probe":
        return _probe(args)
    if args.lab_command == "censor":
        return _censor(args)
    if args.lab_command == "installs":
        return _installs(args)
    return _report(args)


def _blocklist(path: Path | None) -> BlockList | None:
    return BlockList.load(path) if path else None


def _idle_options(args: argparse.Namespace) -> passive.IdleOptions:
    if args.keepalive_timeout <= 0 or args.moment_gap <= 0:
        raise ConfigError("--keepalive-timeout and --moment-gap must be > 0")
    if args.moment_gap >= args.keepalive_timeout:
        raise ConfigError("--moment-gap must be shorter than --keepalive-timeout")
    return passive.IdleOptions(args.keepalive_timeout, args.moment_gap)


def _passive(args: argparse.Namespace) -> int:
    reports: list[passive.FlowReport] = []
    blocklist = _blocklist(args.blocklist)
    idle_options = _idle_options(args)
    for capture in args.captures:
        reports += passive.analyse_pcap(capture, blocklist, idle_options)
    if args.json:
        _emit(json.dumps([r.to_json() for r in reports], indent=2) + "\n")
    else:
        _emit(passive.format_text(reports, verbose=args.all) + "\n")
    return 1 if any(r.flagged for r in reports) else 0


def _probe(args: argparse.Namespace) -> int:
    replay = _read_replay(args.replay) if args.replay else None
    # The target only: a reference nothing answers on is a difference to report, as before.
    if (why := probe.unreachable(args.target)) is not None:
        print(f"veil: error: {why}", file=sys.stderr)
        return 2
    result = probe.probe_server(args.target, args.reference, wait=args.wait, seed=args.seed,
                                replay=replay, sni=args.sni, tls=not args.no_tls)
    if args.json:
        _emit(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        _emit(probe.format_text(result) + "\n")
    return 1 if result.flagged else 0


def _censor(args: argparse.Namespace) -> int:
    if not 0.0 <= args.probability <= 1.0:
        raise ConfigError("--probability takes 0 to 1")
    if args.residual is not None and args.residual < 0:
        raise ConfigError("--residual must be >= 0")
    if args.throttle_drop is not None and args.throttle_after is None:
        raise ConfigError("--throttle-drop needs --throttle-after")
    if args.throttle_ip and args.throttle_after is None:
        raise ConfigError("--throttle-ip needs --throttle-after")
    block = tuple(name.strip() for name in args.block.split(",") if name.strip())
    try:
        rules = Rules(tuple(args.block_ip), frozenset(args.block_port),
                      frozenset(args.block_sni), args.inject_rst, args.throttle_after,
                      1.0 if args.throttle_drop is None else args.throttle_drop,
                      tuple(args.throttle_ip))
        censor = Censor(block=block, residual=args.residual, blocklist=_blocklist(args.blocklist),
                        probability=args.probability, seed=args.seed, rules=rules)
        if args.rules is not None and args.rules.exists():
            Rules.parse(args.rules.read_text())  # a mistake now is a usage error, not a log line
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(str(exc)) from exc
    run_bridge(args.a, args.b, censor, args.rules)
    return 0


def _installs(args: argparse.Namespace) -> int:
    views = []
    for target in (args.a, args.b):
        try:
            host, port, tls = sameinstall.split_target(target)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            views.append(sameinstall.scan(host, port, tls=tls))
        except ssl.SSLError as exc:
            hint = f"; a plain-HTTP site is http://{target}" if tls and "://" not in target else ""
            raise ConfigError(f"cannot scan {target}: no TLS handshake "
                              f"({exc.reason or exc}){hint}") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ConfigError(f"cannot scan {target}: {exc}") from exc
    result = report.InstallsResult(args.a, args.b, sameinstall.compare(*views))
    if args.json:
        _emit(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        _emit(report.format_installs_text(result) + "\n")
    return 1 if result.verdict.flagged else 0


def _report(args: argparse.Namespace) -> int:
    inputs = report.load_inputs(args.inputs, _blocklist(args.blocklist), _idle_options(args))
    rows = report.build_rows(inputs.flows, inputs.probes, inputs.installs)
    text = (report.format_html(rows, inputs.installs) if args.html
            else report.format_text(rows, inputs.installs) + "\n")
    flagged = [r.name for r in rows if r.flagged]
    if args.output:
        args.output.write_text(text)
        # The table went to the file: say where, and the gist, so the run is not silent.
        print(f"veil: wrote {args.output}: "
              + (f"flagged by {', '.join(flagged)}" if flagged else "nothing flagged"),
              file=sys.stderr)
    else:
        _emit(text)
    return 1 if flagged else 0
