#!/usr/bin/env python3
"""Mutation runner for the Redis Lua scripts (`scripts/dev mutants-lua`).

No Rust mutation tool mutates Lua, so the mutants are written by hand in a list
(lua/mutants.txt, format at its top): each is one exact string replacement in one
file. The runner applies them one at a time to a scratch copy of the tree and runs
the tests on it; a mutant is *killed* when the tests fail, *survived* when they pass.

The checkout itself is never modified: the tree is copied (rsync, content-compared)
to <target>/mutants-lua/tree and built into its own target directory,
<target>/mutants-lua/target (seeded from <target>/debug on first use, so only the
flashgate crate is compiled). Each build waits on the checkout's cargo lock
(<target>/debug/.cargo-lock): it never runs alongside a build of the checkout.

Exit status: 0 every mutant killed, 1 some survived, 2 the run could not be made
(a bad list, a mutant whose text is not found exactly once, the unmutated tree fails).
"""

import argparse
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

DEFAULT_TESTS = ["--test", "rules", "--test", "model", "--test", "buckets_model"]
RSYNC_EXCLUDES = ["/target", "/.dev", "/.git", "/bench/results", "/.schemathesis"]


@dataclass
class Mutant:
    name: str
    path: str
    line: int  # of the `mutant` line in the list
    rule: str = ""
    before: str = ""
    after: str = ""
    minus: list = field(default_factory=list)
    plus: list = field(default_factory=list)


def die(message, code=2):
    print(f"mutants-lua: error: {message}", file=sys.stderr)
    sys.exit(code)


def log(message):
    print(f"mutants-lua: {message}", file=sys.stderr, flush=True)


def parse_list(path):
    """Parses the list file; see the comment at its top."""
    mutants = []
    current = None
    last = None  # the kind of the previous line of the entry
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            where = f"{path}:{number}"
            if line.startswith("#") or not line.strip():
                last = None
                continue
            if line.startswith("mutant "):
                parts = line.split()
                if len(parts) != 3:
                    die(f"{where}: expected 'mutant NAME PATH'")
                current = Mutant(name=parts[1], path=parts[2], line=number)
                mutants.append(current)
                last = "mutant"
                continue
            if current is None:
                die(f"{where}: text before the first 'mutant' line")
            if line.startswith("rule ") or line == "rule":
                text = line[5:].strip()
                current.rule = f"{current.rule} {text}".strip()
                last = "rule"
            elif line.startswith("-"):
                if line not in ("-",) and not line.startswith("- "):
                    die(f"{where}: '-' must be followed by one space")
                if current.minus and last != "-":
                    die(f"{where}: the '-' lines of {current.name} must be consecutive")
                current.minus.append(line[2:])
                last = "-"
            elif line.startswith("+"):
                if line not in ("+",) and not line.startswith("+ "):
                    die(f"{where}: '+' must be followed by one space")
                if current.plus and last != "+":
                    die(f"{where}: the '+' lines of {current.name} must be consecutive")
                current.plus.append(line[2:])
                last = "+"
            else:
                die(f"{where}: unknown line (mutant / rule / - / + / #)")
    names = set()
    for m in mutants:
        where = f"{path}:{m.line}"
        if m.name in names:
            die(f"{where}: mutant {m.name} listed twice")
        names.add(m.name)
        if not m.minus or not m.plus:
            die(f"{where}: mutant {m.name} needs '-' and '+' lines")
        if not m.rule:
            die(f"{where}: mutant {m.name} needs a 'rule' line")
        m.before, m.after = "\n".join(m.minus), "\n".join(m.plus)
        if m.before == m.after:
            die(f"{where}: mutant {m.name} changes nothing")
    return mutants


def check_applies(mutants, tree):
    """Every mutant's text occurs exactly once in its file."""
    bad = []
    for m in mutants:
        file = os.path.join(tree, m.path)
        if not os.path.isfile(file):
            bad.append(f"{m.name}: no file {m.path}")
            continue
        with open(file, encoding="utf-8") as f:
            count = f.read().count(m.before)
        if count != 1:
            bad.append(f"{m.name}: its text occurs {count} times in {m.path} (must be once)")
    if bad:
        die("the list does not apply to the tree:\n  " + "\n  ".join(bad))


def rsync(source, dest):
    """Makes dest a copy of source. Content-compared, and without keeping source mtimes:
    a file that differs is written now, so cargo sees it changed (a mutant reverted to
    an older mtime would otherwise leave the mutant's build in place)."""
    os.makedirs(dest, exist_ok=True)
    command = ["rsync", "-rlp", "--checksum", "--delete"]
    for pattern in RSYNC_EXCLUDES:
        command += ["--exclude", pattern]
    command += [source.rstrip("/") + "/", dest.rstrip("/") + "/"]
    subprocess.run(command, check=True)


def seed_target(main_target, scratch_target):
    """First use: copy the checkout's compiled dependencies (cargo's fingerprints decide
    what is still fresh), so only the flashgate crate is built here."""
    debug = os.path.join(scratch_target, "debug")
    if os.path.isdir(debug):
        return
    source = os.path.join(main_target, "debug")
    os.makedirs(debug)
    if not os.path.isdir(source):
        return
    log(f"seeding {debug} from {source} (once)")
    for part in ("build", "deps", ".fingerprint"):
        if os.path.isdir(os.path.join(source, part)):
            subprocess.run(["cp", "-a", "--reflink=auto", os.path.join(source, part), debug],
                           check=True)


class CargoLock:
    """Holds the checkout's build lock while the scratch tree builds: one build at a
    time on this machine, whoever started it."""

    def __init__(self, main_target):
        self.path = os.path.join(main_target, "debug", ".cargo-lock")
        self.file = None

    def __enter__(self):
        if os.path.isdir(os.path.dirname(self.path)):
            self.file = open(self.path, "a")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log("waiting for the checkout's cargo build to finish")
                fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def run(command, cwd, env, log_path, timeout=None):
    """Runs command (its own process group), output to log_path. Returns (rc, output);
    rc None on timeout (the group is killed)."""
    with open(log_path, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = None
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return rc, f.read()


PANIC = re.compile(r"^thread '([^']+)'(?: \(\d+\))? panicked at ([^\n]+):\n((?:.*\n){1,3})",
                   re.MULTILINE)
RUNNING = re.compile(r"^\s*Running (?:unittests )?(\S+)", re.MULTILINE)
FAILED = re.compile(r"^test (\S+) \.\.\. FAILED", re.MULTILINE)


def failures(output):
    """[(binary, test)] that failed, and the first panic's message (up to 3 lines)."""
    failed = []
    marks = [(m.start(), os.path.splitext(os.path.basename(m.group(1)))[0])
             for m in RUNNING.finditer(output)]
    for m in FAILED.finditer(output):
        binary = ""
        for start, name in marks:
            if start < m.start():
                binary = name
        failed.append((binary, m.group(1)))
    panic = PANIC.search(output)
    message = ""
    if panic:
        lines = []
        for line in panic.group(3).splitlines():
            if line.startswith(("stack backtrace:", "note: ")):
                break
            if line.strip():
                lines.append(line.strip())
        message = f"{panic.group(1)}: " + " / ".join(lines)
    return failed, message


def main():
    parser = argparse.ArgumentParser(
        prog="scripts/dev mutants-lua",
        description="Apply each mutant of the list to a scratch copy of the tree and run "
        "the tests: killed (they fail) or survived (they pass).")
    parser.add_argument("--root", required=True, help="the checkout")
    parser.add_argument("--target-dir", required=True, help="the checkout's cargo target dir")
    parser.add_argument("--list", default=None, help="the mutant list (default lua/mutants.txt)")
    parser.add_argument("--source", default=None,
                        help="copy this tree instead of the checkout's working tree")
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--api", action="store_true", help="run --test api too (slower)")
    parser.add_argument("--timeout", type=int, default=1200,
                        help="seconds one test run may take (then: killed, by timeout)")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant applies exactly once")
    parser.add_argument("cargo_args", nargs="*",
                        help="after '--': the `cargo test` selection to run instead of "
                        "the default (" + " ".join(DEFAULT_TESTS) + ")")
    args = parser.parse_args()

    root = os.path.realpath(args.root)
    source = os.path.realpath(args.source or root)
    list_path = args.list or os.path.join(root, "lua", "mutants.txt")
    mutants = parse_list(list_path)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in {m.name for m in mutants}]
        if unknown:
            die(f"no mutant named {', '.join(unknown)} in {list_path}")
        mutants = [m for m in mutants if m.name in wanted]
    if not mutants:
        die(f"no mutants in {list_path}")
    check_applies(mutants, source)
    if args.check:
        log(f"{len(mutants)} mutants, each applies exactly once to {source}")
        return 0

    selection = args.cargo_args or DEFAULT_TESTS + (["--test", "api"] if args.api else [])
    main_target = os.path.realpath(args.target_dir)
    work = os.path.join(main_target, "mutants-lua")
    tree, pristine = os.path.join(work, "tree"), os.path.join(work, "pristine")
    scratch_target, logs = os.path.join(work, "target"), os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    run_lock = open(os.path.join(work, ".lock"), "a")
    try:
        fcntl.flock(run_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        die(f"another mutants-lua run holds {work}/.lock")
    for old in os.listdir(logs):
        os.remove(os.path.join(logs, old))

    started = time.monotonic()
    log(f"copying {source} (the tree every mutant starts from)")
    rsync(source, pristine)
    rsync(pristine, tree)
    seed_target(main_target, scratch_target)
    env = dict(os.environ, CARGO_TARGET_DIR=scratch_target)
    cargo_test = ["cargo", "test", "-p", "flashgate"]

    def build(tag):
        with CargoLock(main_target):
            return run(cargo_test + ["--no-run"] + selection, tree, env,
                       os.path.join(logs, f"{tag}.build.log"))

    def test(tag):
        return run(cargo_test + ["--no-fail-fast"] + selection, tree, env,
                   os.path.join(logs, f"{tag}.test.log"), timeout=args.timeout)

    log(f"baseline: building and testing the unmutated tree ({' '.join(selection)})")
    t0 = time.monotonic()
    rc, output = build("baseline")
    if rc != 0:
        die(f"the unmutated tree does not build (log: {logs}/baseline.build.log):\n"
            + "\n".join(output.splitlines()[-25:]))
    binary = os.path.join(scratch_target, "debug", "flashgate")
    if os.path.exists(binary):
        rc, output = run([binary, "migrate"], tree, env, os.path.join(logs, "migrate.log"))
        if rc != 0:
            die(f"flashgate migrate failed:\n{output[-2000:]}")
    rc, output = test("baseline")
    if rc != 0:
        failed, message = failures(output)
        die("the unmutated tree fails its tests, so no mutant can be judged "
            f"(log: {logs}/baseline.test.log): {failed} {message}")
    log(f"baseline passes ({time.monotonic() - t0:.0f} s)")

    results = []
    for i, m in enumerate(mutants, 1):
        t0 = time.monotonic()
        file = os.path.join(tree, m.path)
        with open(file, encoding="utf-8") as f:
            text = f.read()
        if text.count(m.before) != 1:
            die(f"{m.name}: its text is not in the copied {m.path} exactly once")
        with open(file, "w", encoding="utf-8") as f:
            f.write(text.replace(m.before, m.after, 1))
        try:
            rc, output = build(m.name)
            if rc != 0:
                verdict, detail = "killed", "does not build"
            else:
                rc, output = test(m.name)
                if rc is None:
                    verdict, detail = "killed", f"timeout after {args.timeout} s"
                elif rc == 0:
                    verdict, detail = "SURVIVED", ""
                else:
                    failed, message = failures(output)
                    names = ", ".join(f"{b}::{t}" if b else t for b, t in failed) or f"exit {rc}"
                    verdict, detail = "killed", names + (f"\n      {message}" if message else "")
        finally:
            # Back to the unmutated tree (and any file the tests wrote, e.g. proptest
            # regressions), written now so that cargo rebuilds.
            rsync(pristine, tree)
        seconds = time.monotonic() - t0
        results.append((m, verdict, seconds))
        print(f"[{i}/{len(mutants)}] {m.name} {m.path}: {verdict} ({seconds:.0f} s)"
              + (f" by {detail}" if detail else ""), flush=True)
        if verdict == "SURVIVED":
            print(f"      rule: {m.rule}", flush=True)

    killed = sum(1 for _, v, _ in results if v == "killed")
    total = len(results)
    elapsed = time.monotonic() - started
    print()
    print(f"{'mutant':<8} {'result':<9} {'time':>6}  file")
    for m, verdict, seconds in results:
        print(f"{m.name:<8} {verdict:<9} {seconds:>5.0f}s  {m.path}")
    print(f"\nscore: {killed}/{total} killed ({100 * killed / total:.0f} %), "
          f"{total - killed} survived; {elapsed / 60:.1f} min; logs in {logs}")
    return 0 if killed == total else 1


if __name__ == "__main__":
    sys.exit(main())
