"""Developer tasks: `nox` runs lint, typecheck and tests; `nox -s bench` measures."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[typecheck]")
    session.run("mypy")


@nox.session
def soak(session: nox.Session) -> None:
    """Random convergence histories until TRIO_SYNC_SOAK_SECONDS (default 600) run out."""
    session.install("-e", ".[test]")
    seconds = os.environ.get("TRIO_SYNC_SOAK_SECONDS", "600")  # session.env holds only overrides
    session.run(
        "pytest", "tests/test_convergence.py::test_soak", "-x", "-s", *session.posargs,
        env={"TRIO_SYNC_SOAK_SECONDS": seconds},
    )  # fmt: skip


@nox.session
def crash(session: nox.Session) -> None:
    """Crash trials: TRIO_SYNC_CRASH_TRIALS (default 100) histories in which clients and the
    server are killed with SIGKILL ten times as often as in the soak."""
    session.install("-e", ".[test]")
    trials = os.environ.get("TRIO_SYNC_CRASH_TRIALS", "100")
    session.run(
        "pytest", "tests/test_convergence.py::test_soak", "-x", "-s", *session.posargs,
        env={"TRIO_SYNC_CRASH_TRIALS": trials, "TRIO_SYNC_CRASH_WEIGHT": "10"},
    )  # fmt: skip


@nox.session
def fuzz(session: nox.Session) -> None:
    """Random input against a live server, TRIO_SYNC_FUZZ_EXAMPLES (default 5000) per test."""
    session.install("-e", ".[test]")
    examples = os.environ.get("TRIO_SYNC_FUZZ_EXAMPLES", "5000")
    session.run(
        "pytest", "tests/test_fuzz.py", "tests/test_server_limits.py", *session.posargs,
        env={"TRIO_SYNC_FUZZ_EXAMPLES": examples},
    )  # fmt: skip


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".")
    session.run("python", "benchmarks/bench.py", *session.posargs)
    # Emulated links need root (network namespaces, tc); without it the section says so.
    session.run("python", "benchmarks/bench.py", "--links", *session.posargs)
    session.run("python", "benchmarks/serverio.py", *session.posargs)
    session.run("python", "benchmarks/load.py", *session.posargs)
    session.run("python", "benchmarks/latency.py", *session.posargs)
