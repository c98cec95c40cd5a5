"""Run an untrusted Python program in a separate, limited process (the `code` reward's test runner).

Nothing here execs the program in the trainer: each run is `python -I prog.py` in a new session, with
stdin from a file and stdout/stderr to anonymous files, in a throwaway working directory deleted after.

Every mode applies, via setrlimit in the child: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size
of any file written, stdout/stderr included (RLIMIT_FSIZE, just over max_output_bytes), processes
(RLIMIT_NPROC), no core dumps; plus a wall-clock timeout, after which (and after every run) the whole
process group is SIGKILLed, as it is when the trainer dies (parent-death signal, where util-linux setpriv
exists). Only max_output_bytes of each stream is read back, and a run whose output went over it is not
`ok` (Python may exit 0 after failing to write it). The environment is minimal (PATH, HOME, locale), so
the trainer's tokens and keys do not reach the program.

On top of that, the strongest of these that works here is used (`CodeSandbox.isolation`; probed once):

- "namespaces" (root with util-linux unshare + setpriv; CI and containers): new network namespace (no
  network, not even the trainer's localhost ports), PID namespace (the program is PID 1: when it ends or is
  killed, every process it forked dies too, and it can see or signal nothing outside), IPC namespace and
  mount namespace in which / is read-only and /tmp is the working directory on a private size-capped
  tmpfs (/dev/shm, /var/tmp, /run/lock, /dev/mqueue are covered too). The program runs as an unprivileged
  uid that no other run, in this process or another (e.g. other trainer ranks), holds at the same time
  (uid_base upwards, leased with a lock file), so RLIMIT_NPROC counts only its own processes; with
  no_new_privs; and after the run every process of that uid is killed.
- "userns" (non-root where unprivileged user namespaces are allowed): the same namespaces and mounts; the
  program is root of its own user namespace, i.e. your uid outside (other mounts you can write stay
  writable). RLIMIT_NPROC is set to your current task count + max_procs.
- "uid" (root without usable namespaces): the uid drop, RLIMIT_NPROC and the kill of the uid's processes;
  the network is reachable and world-writable places such as /tmp are writable.
- "rlimits" (non-root without user namespaces): only the limits. The program runs as you: it can use the
  network, write what you can, and signal your processes, the trainer included; a child that leaves the
  process group outlives the run. Use a container for untrusted models. Refused for root, for whom
  RLIMIT_NPROC does not bind: a fork bomb would take the host.
"""

from __future__ import annotations

import fcntl
import math
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

MODES = ("namespaces", "userns", "uid", "rlimits")

# Run by /bin/sh as (namespace) root inside the new namespaces, before the program: $1 host work dir, $2 the
# uid to drop to ("" = stay), $3 tmpfs size, $4 the interpreter. The private tmpfs is the only writable place.
_SETUP = r"""
set -e
mount -t tmpfs -o size="$3",mode=0755 tmpfs /dev/shm
mkdir -m 0700 /dev/shm/work
cp "$1/prog.py" /dev/shm/work/
[ -z "$2" ] || chown "$2:$2" /dev/shm/work
mount --bind /dev/shm/work /tmp
for d in /var/tmp /run/lock /dev/mqueue; do
  if [ -d "$d" ]; then mount -t tmpfs -o ro,size=4k tmpfs "$d"; fi
done
mount -o remount,bind,ro /
cd /tmp
if [ -n "$2" ]; then set -- --reuid="$2" --regid="$2" --clear-groups "$4"; else set -- "$4"; fi
exec setpriv --nnp --pdeathsig KILL "$@" -I prog.py
"""
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_probed: dict[tuple, str] = {}
_probe_lock = threading.Lock()


class SandboxError(RuntimeError):
    """No isolation mode that is safe here works (or the one asked for does not)."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: Optional[int]
    stdout: str  # at most max_output_bytes of it, decoded as UTF-8 (invalid bytes replaced)
    stderr: str
    timed_out: bool
    truncated: bool = False  # stdout or stderr went over max_output_bytes

    @property
    def ok(self) -> bool:
        """Exited 0 in time, with all its output."""
        return self.returncode == 0 and not self.timed_out and not self.truncated


def _tasks_of(uid: int) -> int:
    """Tasks (threads count: RLIMIT_NPROC counts them) whose real uid is `uid`."""
    total = 0
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/status", encoding="ascii", errors="replace") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
    return total


@contextmanager
def _uid_lease(base: int) -> Iterator[int]:
    """The first uid from `base` that no other run holds, in any process: an flock on a per-uid file (freed
    when its holder exits, however it exits)."""
    folder = os.path.join(tempfile.gettempdir(), "rlhf-sandbox-uids")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:  # lstat: no symlink
        raise SandboxError(f"{folder} must be a directory of ours that no one else can write; remove it")
    for uid in range(base, base + 4096):
        fd = os.open(os.path.join(folder, str(uid)), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            os.close(fd)
        return
    raise SandboxError(f"all 4096 sandbox uids from {base} are in use")


def _exited_within(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for exit without reaping, so the process group id stays reserved for the kill that follows."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): reaping first leaves a tiny pid-reuse window
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], max(timeout, 0.0))[0])
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    # A program may leave directories it made unreadable; make them ours again (never through a symlink).
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                with suppress(OSError):
                    os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def default_python() -> str:
    """This interpreter's real file: a virtualenv's `bin/python` is a symlink that may sit under /tmp, which the
    sandbox replaces with its private tmpfs (the test programs need only the standard library). An interpreter
    that itself lives under /tmp falls back to the system's python3."""
    real = os.path.realpath(sys.executable)
    if real.startswith("/tmp/"):
        system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        return os.path.realpath(system) if system else real
    return real


class CodeSandbox:
    """Runs Python programs one process each, at most max_workers at a time (see the module docstring).

    timeout_s: wall-clock limit of a run. memory_mb: address-space limit. cpu_s: CPU-seconds limit (default
    ceil(timeout_s)). max_procs: processes/threads the program may add. max_output_bytes: cap on each of
    stdout/stderr and on any file written. max_workers: concurrent runs (default min(4, cpu count)).
    tmpfs_mb: size of the private tmpfs holding the working directory (namespace modes). isolation: auto
    (the strongest that works) or one of MODES. python: the interpreter (default: this one's real file, see default_python). uid_base: the
    lowest uid programs run as when root ("namespaces", "uid"); uids from it up must belong to no one.
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 1024, cpu_s: Optional[int] = None,
                 max_procs: int = 32, max_output_bytes: int = 1 << 20, max_workers: Optional[int] = None,
                 tmpfs_mb: int = 64, isolation: str = "auto", python: Optional[str] = None, uid_base: int = 64000):
        if isolation not in ("auto", *MODES):
            raise ValueError(f"isolation must be auto or one of {', '.join(MODES)}, got {isolation!r}")
        if timeout_s <= 0 or memory_mb <= 0 or max_procs <= 0 or max_output_bytes <= 0 or tmpfs_mb <= 0:
            raise ValueError("timeout_s, memory_mb, max_procs, max_output_bytes and tmpfs_mb must be positive")
        self.timeout_s, self.memory_mb, self.max_procs = float(timeout_s), int(memory_mb), int(max_procs)
        self.cpu_s = int(cpu_s) if cpu_s is not None else max(1, math.ceil(timeout_s))
        self.max_output_bytes, self.tmpfs_mb = int(max_output_bytes), int(tmpfs_mb)
        self.max_workers = int(max_workers) if max_workers else min(4, os.cpu_count() or 1)
        self.requested, self.python, self.uid_base = isolation, python or default_python(), int(uid_base)
        self._slots = threading.BoundedSemaphore(self.max_workers)

    # ---- public API ---------------------------------------------------------------------------------

    @property
    def isolation(self) -> str:
        """The mode runs use: probed on first use (once per interpreter), see the module docstring."""
        key = (self.requested, self.python, self.uid_base)
        with _probe_lock:
            if key not in _probed:
                _probed[key] = self._choose_mode()
            return _probed[key]

    def run(self, program: str, stdin: str = "") -> SandboxResult:
        """Run `program` (Python source) with `stdin`; blocks while max_workers runs are in flight."""
        mode = self.isolation
        with self._slots:
            return self._execute(mode, program, stdin)

    def run_many(self, jobs: Sequence[tuple[str, str]]) -> list[SandboxResult]:
        """run() each (program, stdin), up to max_workers at a time; results in the order of `jobs`."""
        if not jobs:
            return []
        _ = self.isolation  # probe once here rather than in a race of worker threads
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    # ---- modes --------------------------------------------------------------------------------------

    def _choose_mode(self) -> str:
        root = os.geteuid() == 0
        if self.requested == "rlimits" and root or self.requested in ("namespaces", "uid") and not root:
            raise SandboxError(f"isolation={self.requested} needs {'a non-root user' if root else 'root'}"
                               + (": RLIMIT_NPROC does not bind root, so a fork bomb would take the host" if root
                                  else ""))
        auto = ["namespaces", "uid"] if root else ["userns", "rlimits"]
        candidates = auto if self.requested == "auto" else [self.requested]
        failures = []
        for mode in candidates:
            why = self._probe(mode)
            if why is None:
                if failures:
                    warnings.warn(f"code sandbox: using isolation={mode}, weaker than {'; '.join(failures)}",
                                  RuntimeWarning, stacklevel=3)
                return mode
            failures.append(f"{mode} (unavailable: {why})")
        raise SandboxError(f"no code sandbox works with python={self.python}: {'; '.join(failures)}"
                           + (". As root the program must run as another uid: make the interpreter readable "
                              "and executable by others, or pass python=" if root else ""))

    def _probe(self, mode: str) -> Optional[str]:
        """None when `print('ok')` runs in `mode`, else why not."""
        if mode in ("namespaces", "userns") and not (shutil.which("unshare") and shutil.which("setpriv")):
            return "util-linux unshare/setpriv not found"
        try:
            with self._slots:
                result = self._execute(mode, "print('ok')", "", timeout_s=max(self.timeout_s, 10.0))
        except OSError as e:
            return str(e)
        if result.ok and result.stdout.strip() == "ok":
            return None
        tail = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        return "timed out" if result.timed_out else tail

    def _command(self, mode: str, workdir: str, uid: Optional[int]) -> list[str]:
        setpriv = shutil.which("setpriv")
        # Killed if the trainer thread that started it dies: nothing else would end a sleeping program then.
        orphan_guard = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
        if mode not in ("namespaces", "userns"):
            return [*orphan_guard, self.python, "-I", "prog.py"]
        user = ["--user", "--map-root-user"] if mode == "userns" else []
        return [*orphan_guard, shutil.which("unshare") or "unshare", *user, "--net", "--ipc", "--pid", "--fork",
                "--kill-child", "--mount-proc", "--", "/bin/sh", "-c", _SETUP, "sh", workdir,
                "" if uid is None else str(uid), f"{self.tmpfs_mb}m", self.python]

    def _limits(self, mode: str) -> Callable[[], None]:
        # Only setrlimit calls run in the forked child: preexec_fn runs in a fork of a threaded parent, where
        # anything that takes a lock (imports, logging) could deadlock.
        nproc = self.max_procs if mode in ("namespaces", "uid") else _tasks_of(os.getuid()) + self.max_procs
        limits = [
            (resource.RLIMIT_CPU, (self.cpu_s, self.cpu_s + 1)),  # SIGXCPU at the soft limit, SIGKILL at hard
            (resource.RLIMIT_AS, (self.memory_mb << 20,) * 2),
            (resource.RLIMIT_FSIZE, (self.max_output_bytes + 1,) * 2),  # one byte over: a sign of truncation
            (resource.RLIMIT_NPROC, (nproc,) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ]
        setrlimit = resource.setrlimit

        def apply() -> None:
            for which, value in limits:
                setrlimit(which, value)

        return apply

    # ---- one run ------------------------------------------------------------------------------------

    def _execute(self, mode: str, program: str, stdin: str, timeout_s: Optional[float] = None) -> SandboxResult:
        if mode not in ("namespaces", "uid"):
            return self._execute_as(mode, None, program, stdin, timeout_s)
        with _uid_lease(self.uid_base) as uid:
            return self._execute_as(mode, uid, program, stdin, timeout_s)

    def _execute_as(self, mode: str, uid: Optional[int], program: str, stdin: str,
                    timeout_s: Optional[float]) -> SandboxResult:
        namespaced = mode in ("namespaces", "userns")
        workdir = tempfile.mkdtemp(prefix="rlhf-sandbox-")
        try:
            with open(os.path.join(workdir, "prog.py"), "w", encoding="utf-8") as f:
                f.write(program)
            if mode == "uid":
                os.chown(workdir, uid, uid)
            home = "/tmp" if namespaced else workdir
            env = {"PATH": _PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   # one BLAS/OpenMP thread: many would hit RLIMIT_NPROC and RLIMIT_AS for nothing
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            drop = {"user": uid, "group": uid, "extra_groups": []} if mode == "uid" else {}
            with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, \
                    tempfile.TemporaryFile() as ferr:
                fin.write(stdin.encode("utf-8"))
                fin.seek(0)
                proc = subprocess.Popen(self._command(mode, workdir, uid), stdin=fin, stdout=fout, stderr=ferr,
                                        cwd=workdir, env=env, start_new_session=True,
                                        preexec_fn=self._limits(mode), **drop)
                timed_out = not _exited_within(proc, self.timeout_s if timeout_s is None else timeout_s)
                self._kill(proc, uid, timed_out, namespaced)
                cap = self.max_output_bytes
                fout.seek(0)
                ferr.seek(0)
                out, err = fout.read(cap + 1), ferr.read(cap + 1)
            return SandboxResult(proc.returncode, out[:cap].decode("utf-8", "replace"),
                                 err[:cap].decode("utf-8", "replace"), timed_out, max(len(out), len(err)) > cap)
        finally:
            _remove_tree(workdir)

    def _kill(self, proc: subprocess.Popen, uid: Optional[int], timed_out: bool, namespaced: bool) -> None:
        """Leave nothing of the run alive, finished or not, then reap it."""
        if uid is not None:
            # kill(-1) as the sandbox uid signals every process of that uid in one sweep, those that left
            # the process group or namespace init included; the helper's own RLIMIT_NPROC is the trainer's,
            # so it starts even when the program used up its own.
            subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={"PATH": _PATH}, check=False)
            if timed_out:  # unshare notices its child died and exits; then it, not init, reaps the child
                _exited_within(proc, 1.0)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if uid is not None and not namespaced:
            # Without a PID namespace the killed orphans are reaped by the host's init, in its own time; until
            # then they count against the uid's RLIMIT_NPROC, so the uid is not leased again before they are gone.
            deadline = time.monotonic() + 5.0
            while _tasks_of(uid) and time.monotonic() < deadline:
                time.sleep(0.05)
