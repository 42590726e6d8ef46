"""A fork server for the tests' worker processes: Python processes that start in milliseconds instead of 6-10 s.

Almost every multi-process test runs a worker script on 2-4 ranks, and every fresh interpreter pays the import of
torch, Lightning and this package (5-6 s on 2 CPU cores, more under load). This module starts, once per pytest
session and on first use, one server process that imports them (``PRELOAD``) and then does nothing but fork: each
request becomes a child of the server that takes the requester's environment, working directory, stdin/stdout/stderr
(passed as file descriptors over a Unix socket) and argv, then runs the script, ``-m`` module or ``-c`` code as
``python`` would (``__main__``, ``sys.argv``, ``sys.path[0]``, ``PYTHONWARNINGS``, exit code, ``atexit``). The
children are real, separate processes: ranks meet over gloo on 127.0.0.1 with real collectives, get SIGKILLed,
SIGSTOPped or time out exactly as before. Each child is the leader of a new session (``os.killpg`` ends it and
whatever it started).

Use it through :func:`Popen` / :func:`run` (drop-in for ``subprocess.Popen`` / ``subprocess.run`` with the subset of
arguments the tests use) or :func:`run_ranks` (N ranks started as torchrun would, ``LOCAL_RANK`` set, instead of
Lightning re-running the script for ranks 1..N-1). A command that is not ``[sys.executable, script | -m mod | -c
code, ...]``, or whose environment changes what an interpreter reads at start-up (``PYTHONPATH``, ``OMP_NUM_THREADS``,
...: ``_STARTUP_PREFIXES``), runs as a fresh process as before; so does everything with
``LOCALSGD_TESTS_NO_FORKSERVER=1``.

The server forks only while single-threaded: it imports modules and never runs a torch operation (it refuses to
start, and every process then starts fresh, if the imports left a thread or an initialized CUDA behind).

Where a forked process differs from a fresh one: it shares the server's string-hash seed (``PYTHONHASHSEED``) with
its sibling ranks, and the modules come imported from the server's start (an edit to the package during a session
is not seen). Tests whose subject is start-up itself (what an import pulls in, a console script, Lightning's own
launcher) start fresh interpreters with ``subprocess``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DISABLE_ENV = "LOCALSGD_TESTS_NO_FORKSERVER"
#: what the server imports before forking (what the workers import; each costs nothing once preloaded)
PRELOAD = (
    "numpy", "torch", "torch.distributed", "torch.nn.functional", "torch.utils.data", "torch.distributed.fsdp",
    "torch.distributed.checkpoint", "torch.distributed.algorithms.ddp_comm_hooks.default_hooks",
    "lightning", "lightning.pytorch", "lightning.pytorch.callbacks", "lightning.pytorch.loggers",
    "lightning.pytorch.strategies", "lightning.pytorch.cli",
    "lightning_localsgd", "lightning_localsgd.cli", "lightning_localsgd.examples.gpt",
    "lightning_localsgd.examples.data", "lightning_localsgd.federation", "lightning.pytorch.demos.transformer",
    "torchft", "deepspeed", "transformers.models.gpt2.modeling_gpt2", "pytest",
)
#: environment variables read when an interpreter or a native library starts: a request that sets them otherwise
#: than the server's environment runs as a fresh process (PYTHONWARNINGS is applied in the child)
_STARTUP_PREFIXES = ("PYTHON", "OMP_", "MKL_", "KMP_", "GOMP_", "LD_", "CUDA_", "TORCH", "PYTORCH_", "DS_", "HF_",
                     "TRANSFORMERS_", "TOKENIZERS_", "NCCL_", "GLOO_", "MALLOC_")
_STARTUP_EXEMPT = {"PYTHONWARNINGS", "TORCHFT_CONNECT_TIMEOUT_SEC"}  # applied in the child / read when used
#: DeepSpeed picks its accelerator when imported (the server's import: CPU here); DS_ACCELERATOR naming that one is
#: the same start-up, another one is not
_DS_ACCELERATOR = "DS_ACCELERATOR"
#: the server's own environment: the pytest process's, with the settings every worker launch uses
_SERVER_ENV_SET = {"OMP_NUM_THREADS": "1"}
_SERVER_ENV_DROP = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "GROUP_RANK",
                    "PL_GLOBAL_SEED", "PYTHONWARNINGS", _DS_ACCELERATOR)
#: the environment the server starts from; tests/conftest.py sets it when the session starts (before any test's
#: monkeypatch), else the environment of the first use
BASE_ENV: dict[str, str] | None = None

PIPE, STDOUT, DEVNULL = subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL
TimeoutExpired, CompletedProcess = subprocess.TimeoutExpired, subprocess.CompletedProcess


# ====================================================================================================== the server
def _server_main(sock_path: str) -> None:
    import warnings

    base = list(warnings.filters)  # the interpreter's own filters (the server runs without -W / PYTHONWARNINGS)
    env_before = dict(os.environ)
    for name in PRELOAD:
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 (a module that does not import is imported by the child, as before)
            print(f"[forkserver] preload {name} failed: {e!r}", file=sys.stderr, flush=True)
    _FILTERS["prefix"], _FILTERS["suffix"] = _split_filters(list(warnings.filters), base)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
    if threads != 1:
        print(f"[forkserver] {threads} threads after the imports: refusing to fork", file=sys.stderr, flush=True)
        sys.exit(3)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child could not use CUDA
        print("[forkserver] CUDA initialized by the imports: refusing to fork", file=sys.stderr, flush=True)
        sys.exit(3)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(64)
    ds = sys.modules.get("deepspeed.accelerator.real_accelerator")
    ds_name = ds.ds_accelerator.device_name() if ds is not None and ds.ds_accelerator is not None else None
    # what the imports set in os.environ (DeepSpeed: TORCHINDUCTOR_CACHE_DIR, ...), as they would in a fresh process
    added = {k: v for k, v in os.environ.items() if env_before.get(k) != v}
    _ADDED_ENV.update(added)
    sys.stdout.write("ready " + json.dumps({"ds_accelerator": ds_name, "added_env": added}) + "\n")
    sys.stdout.flush()
    children: dict[int, socket.socket] = {}  # pid -> the connection of its requester
    conns: dict[socket.socket, int] = {}
    try:
        while True:
            readable, _, _ = select.select([listener, sys.stdin, *conns], [], [], 0.02)
            for r in readable:
                if r is sys.stdin:
                    if not os.read(sys.stdin.fileno(), 4096):  # the pytest process is gone
                        return
                elif r is listener:
                    conn, _ = listener.accept()
                    try:
                        request, fds = _receive(conn)
                    except Exception as e:  # noqa: BLE001
                        print(f"[forkserver] bad request: {e!r}", file=sys.stderr, flush=True)
                        conn.close()
                        continue
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        code = 70
                        try:
                            listener.close()
                            for c in (*conns, conn):
                                c.close()
                            code = _child_main(request, fds)
                        except BaseException:  # noqa: BLE001 (setting up the child failed: say why)
                            import traceback

                            traceback.print_exc()
                        finally:
                            os._exit(code)
                    for fd in fds:
                        os.close(fd)
                    children[pid], conns[conn] = conn, pid
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                else:  # the requester closed its end: it no longer wants the process
                    pid = conns.pop(r)
                    r.close()
                    if pid in children:
                        _killpg(pid)
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is None:
                    continue
                rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                try:
                    conn.sendall(json.dumps({"rc": rc}).encode() + b"\n")
                except OSError:
                    pass
                conns.pop(conn, None)
                conn.close()
    finally:
        for pid in children:
            _killpg(pid)


def _killpg(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 8, 3)
    while len(head) < 8:
        head += conn.recv(8 - len(head))
    (size,) = struct.unpack("!Q", head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise EOFError("request cut short")
        body += chunk
    if len(fds) != 3:
        raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    return json.loads(body), list(fds)


def _child_main(request: dict, fds: list[int]) -> int:
    """In the forked child: become what ``python <argv>`` started in ``cwd`` with ``env`` would be, then run."""
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**_ADDED_ENV, **request["env"]})
    import random
    import warnings

    random.seed()  # a fresh interpreter's random states (each process its own), not the server's copy
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:  # `import torch` seeds its CPU generator nondeterministically
        sys.modules["torch"].default_generator.seed()
    # a fresh interpreter: its own filters, then PYTHONWARNINGS's in front of them, then what the imports added
    options = [o for o in os.environ.get("PYTHONWARNINGS", "").split(",") if o]
    sys.warnoptions[:] = options
    warnings.filters[:] = _FILTERS["base"]
    warnings._processoptions(options)
    warnings.filters[:] = _FILTERS["prefix"] + warnings.filters + _FILTERS["suffix"]
    warnings._filters_mutated()
    kind, target, args = request["kind"], request["target"], request["args"]
    code = 0
    import runpy

    try:
        if kind == "script":
            sys.argv = [target, *args]
            sys.path[0] = os.path.dirname(os.path.realpath(target))
            runpy.run_path(target, run_name="__main__")
        elif kind == "module":
            sys.argv = [target, *args]  # runpy sets argv[0] to the module's file, as `python -m` does
            sys.path[0] = os.getcwd()
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:  # -c
            import types

            sys.argv = ["-c", *args]
            sys.path[0] = ""
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code & 0xFF
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught exception)
        kind_, value, tb = sys.exc_info()
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>"):
            tb = tb.tb_next  # the traceback starts in the script, as a fresh interpreter's does
        sys.excepthook(kind_, value.with_traceback(tb), tb)
        code = 1
    try:
        threading._shutdown()  # wait for non-daemon threads, as interpreter shutdown does
    except Exception:  # noqa: BLE001
        pass
    try:
        atexit._run_exitfuncs()
    except Exception:  # noqa: BLE001
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            code = code or 120
    return code


_FILTERS: dict[str, list] = {"base": [], "prefix": [], "suffix": []}
_ADDED_ENV: dict[str, str] = {}


def _split_filters(now: list, base: list) -> tuple[list, list]:
    """The filters the imports put in front of the interpreter's (``base``) and after them."""
    _FILTERS["base"] = base
    for i in range(len(now) - len(base) + 1):
        if now[i:i + len(base)] == base:
            return now[:i], now[i + len(base):]
    return [f for f in now if f not in base], []


# ====================================================================================================== the client
class _Server:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="localsgd-forkserver-")
        self.sock = os.path.join(self.dir, "sock")
        env = {k: v for k, v in (os.environ if BASE_ENV is None else BASE_ENV).items() if k not in _SERVER_ENV_DROP}
        env.update(_SERVER_ENV_SET)
        self.env = env
        self.info: dict | None = None
        self.log = open(os.path.join(self.dir, "server.log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.sock], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, cwd=self.dir)
        atexit.register(self.close)

    def wait_ready(self) -> None:
        if self.info is not None:
            return
        line = " "
        while line and not line.startswith("ready "):  # (an import may print to stdout: DeepSpeed's logger does)
            line = self.proc.stdout.readline().decode()
        if not line.startswith("ready "):
            self.proc.kill()
            self.proc.wait()
            why = Path(self.log.name).read_text()[-2000:]
            self.close()
            raise RuntimeError("fork server did not start: " + why)
        self.info = json.loads(line[len("ready "):])

    def refuses(self, env: dict[str, str]) -> str | None:
        """Why a process with ``env`` would not start as a fork of the server as it would as a fresh interpreter
        (None: it would)."""
        added = self.info["added_env"]  # set by the server's imports: a fresh process's imports set them too
        keys = {k for k in (*env, *self.env) if k.startswith(_STARTUP_PREFIXES) and k not in _STARTUP_EXEMPT}
        keys -= {_DS_ACCELERATOR, *added}
        if env.get(_DS_ACCELERATOR) not in (None, self.info["ds_accelerator"]):
            return _DS_ACCELERATOR
        differ = sorted(k for k in keys if env.get(k) != self.env.get(k))
        differ += sorted(k for k, v in added.items() if env.get(k) not in (None, v))
        return ",".join(differ) or None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF: the server kills what is left and exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_server: _Server | None = None
#: processes started by the server / as fresh interpreters (with why) in this session: tests/conftest.py reports them
STATS: dict = {"forked": 0, "fresh": 0, "reasons": {}}
_server_failed = False


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") in ("", "0")


def start() -> None:
    """Start the server in the background (its imports overlap with whatever runs until its first use)."""
    global _server
    if enabled() and not _server_failed and (_server is None or not _server.alive()):
        _server = _Server()


def _get_server() -> _Server | None:
    global _server_failed
    if not enabled() or _server_failed:
        return None
    try:
        start()
        _server.wait_ready()
    except Exception as e:  # noqa: BLE001 (fall back to fresh processes)
        print(f"fork server unavailable, using fresh processes: {e}", file=sys.stderr)
        _server_failed = True
        return None
    return _server


def _parse(cmd: list[str]) -> tuple[str, str, list[str]] | None:
    """``[python, script|-m mod|-c code, *args]`` -> (kind, target, args); None for anything else."""
    cmd = [str(c) for c in cmd]
    if len(cmd) < 2 or os.path.realpath(cmd[0]) != os.path.realpath(sys.executable):
        return None
    if cmd[1] == "-m" and len(cmd) >= 3:
        return "module", cmd[2], cmd[3:]
    if cmd[1] == "-c" and len(cmd) >= 3:
        return "code", cmd[2], cmd[3:]
    if cmd[1].startswith("-"):
        return None
    return "script", os.path.abspath(cmd[1]), cmd[2:]


class Popen:
    """``subprocess.Popen`` for a ``[sys.executable, ...]`` command, started by the fork server when it can be
    (otherwise a plain ``subprocess.Popen``). Supports stdin/stdout/stderr as None, DEVNULL, PIPE (stdout/stderr),
    STDOUT (stderr), a file object or a file descriptor; ``text``; ``cwd``; ``env``. ``start_new_session`` is always
    true for a forked process."""

    def __init__(self, cmd, *, stdin=None, stdout=None, stderr=None, env=None, cwd=None, text=False,
                 start_new_session=False, _force_fresh=False) -> None:
        self.args = cmd
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None
        env = dict(os.environ if env is None else env)
        parsed = None if _force_fresh else _parse(cmd)
        server = _get_server() if parsed is not None else None
        reason = "not [sys.executable, script|-m|-c]" if parsed is None else "no server" if server is None else None
        if server is not None:
            reason = server.refuses(env)
            if reason is not None:
                reason, server = "environment: " + reason, None
        self.forked = server is not None
        STATS["forked" if self.forked else "fresh"] += 1
        if reason is not None:
            STATS["reasons"][reason] = STATS["reasons"].get(reason, 0) + 1
        if not self.forked:
            self._proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                          text=text, start_new_session=start_new_session)
            self.pid, self.stdin, self.stdout, self.stderr = (self._proc.pid, self._proc.stdin, self._proc.stdout,
                                                              self._proc.stderr)
            return
        self._proc = None
        to_close: list[int] = []

        pipes: dict[str, int] = {}

        def fd_for(spec, default: int, name: str) -> int:
            """The child's descriptor for ``name`` (stdin / stdout / stderr), as subprocess reads ``spec``."""
            if spec is None:
                return default
            if spec == DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                to_close.append(fd)
                return fd
            if spec == PIPE:  # the parent reads the other end
                r, w = os.pipe()
                pipes[name] = r
                to_close.append(w)
                return w
            if isinstance(spec, int):
                return spec
            return spec.fileno()

        in_fd = fd_for(stdin if stdin is not None else DEVNULL, 0, "stdin")
        out_fd = fd_for(stdout, 1, "stdout")
        err_fd = out_fd if stderr == STDOUT else fd_for(stderr, 2, "stderr")
        kind, target, args = parsed
        request = {"kind": kind, "target": target, "args": args, "env": env,
                   "cwd": os.path.abspath(cwd) if cwd is not None else os.getcwd()}
        body = json.dumps(request).encode()
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._conn.connect(server.sock)
            socket.send_fds(self._conn, [struct.pack("!Q", len(body))], [in_fd, out_fd, err_fd])
            self._conn.sendall(body)
        finally:
            for fd in to_close:
                os.close(fd)
        self._buffer = b""
        self.pid = self._read_message(timeout=60)["pid"]
        for name, fd in pipes.items():
            setattr(self, name, open(fd, "r" if text else "rb", **({"encoding": "utf-8", "errors": "replace"}
                                                                      if text else {})))

    def _read_message(self, timeout: float | None) -> dict | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._conn], [], [], left)
            if not ready:
                return None
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the fork server went away")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self._proc is not None:
            self.returncode = self._proc.poll()
        elif self.returncode is None:
            message = self._read_message(timeout=0)
            if message is not None:
                self.returncode = message["rc"]
                self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self._proc is not None:
            self.returncode = self._proc.wait(timeout=timeout)
            return self.returncode
        if self.returncode is None:
            message = self._read_message(timeout)
            if message is None:
                raise TimeoutExpired(self.args, timeout)
            self.returncode = message["rc"]
            self._conn.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self._proc is not None:
            self._proc.send_signal(sig)
        elif self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the process and, for a forked one, everything it started (its session)."""
        if self._proc is not None:
            self._proc.kill()
        elif self.poll() is None:
            _killpg(self.pid)

    def communicate(self, timeout: float | None = None) -> tuple:
        if self._proc is not None:
            return self._proc.communicate(timeout=timeout)
        out = self.stdout.read() if self.stdout else None
        err = self.stderr.read() if self.stderr else None
        self.wait(timeout)
        return out, err

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


def run(cmd, *, env=None, cwd=None, timeout: float | None = None, capture_output=False, text=False, stdout=None,
        stderr=None, check=False) -> CompletedProcess:
    """``subprocess.run`` through the fork server (captured output goes through temporary files)."""
    if capture_output:
        stdout = stderr = PIPE
    files = {}
    with tempfile.TemporaryDirectory(prefix="localsgd-run-") as tmp:
        specs = {}
        for name, spec in (("stdout", stdout), ("stderr", stderr)):
            if spec == PIPE:
                files[name] = open(os.path.join(tmp, name), "w+b")  # noqa: SIM115
                specs[name] = files[name]
            else:
                specs[name] = spec
        proc = Popen(cmd, env=env, cwd=cwd, stdout=specs["stdout"], stderr=specs["stderr"])
        try:
            proc.wait(timeout=timeout)
        except TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            out = {}
            for name, f in files.items():
                f.seek(0)
                data = f.read()
                f.close()
                out[name] = data.decode("utf-8", "replace") if text else data
    result = CompletedProcess(cmd, proc.returncode, out.get("stdout"), out.get("stderr"))
    if check:
        result.check_returncode()
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cmd, world: int, *, env=None, cwd=None, timeout: float | None = None, capture_output=True,
              text=True, grace: float = 5.0) -> CompletedProcess:
    """Run ``cmd`` (``[sys.executable, script, ...]``, the script calling ``Trainer(devices=world)``) on ``world``
    ranks started together with ``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*`` set, as torchrun does, their stdout and
    stderr together as Lightning's launcher leaves them (one stream per kind). Like that launcher's run: the return
    code is rank 0's; a rank > 0 that fails while rank 0 runs has every rank SIGKILLed after ``grace`` seconds
    (Lightning's child-process observer does so within 5 s), rank 0's code then being -9; it waits for every rank;
    past ``timeout`` every rank is killed and ``subprocess.TimeoutExpired`` raised."""
    env = dict(os.environ if env is None else env)
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "RANK"):
        env.pop(var, None)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="localsgd-ranks-") as tmp:
        out_f = open(os.path.join(tmp, "stdout"), "w+b")  # noqa: SIM115
        err_f = open(os.path.join(tmp, "stderr"), "w+b")  # noqa: SIM115
        procs: list[Popen] = []
        try:
            for r in range(world):
                rank_env = {**env, "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": str(world),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                procs.append(Popen(cmd, env=rank_env, cwd=cwd, stdout=out_f if capture_output else None,
                                   stderr=err_f if capture_output else None))
            deadline = None if timeout is None else time.monotonic() + timeout
            child_failed_at = None
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    break
                if child_failed_at is None and codes[0] is None and any(c not in (None, 0) for c in codes[1:]):
                    child_failed_at = time.monotonic()
                if child_failed_at is not None and codes[0] is None and time.monotonic() - child_failed_at > grace:
                    for p in procs:
                        p.kill()
                if deadline is not None and time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    for p in procs:
                        p.wait()
                    raise TimeoutExpired(cmd, timeout)
                time.sleep(0.02)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            out = []
            for f in (out_f, err_f):
                f.seek(0)
                data = f.read()
                f.close()
                out.append(data.decode("utf-8", "replace") if text else data)
    return CompletedProcess(cmd, procs[0].returncode, *(out if capture_output else (None, None)))


_SPAWN_CODE = """
import pickle, sys
with open(sys.argv[1], "rb") as f:
    sys.path[:] = pickle.load(f)  # the parent's (pytest's) path: the function's module imports by the same name
    fn, args = pickle.load(f)
fn(int(sys.argv[2]), *args)
"""


def spawn_processes(fn, args: tuple = (), nprocs: int = 1, env: dict[str, str] | None = None) -> list[Popen]:
    """Start ``fn(rank, *args)`` for rank 0..nprocs-1, each in its own process forked by the server, as
    ``torch.multiprocessing.start_processes(start_method="spawn")`` starts them in fresh interpreters (``fn`` and
    ``args`` pickled, by reference for functions; the child's ``sys.path`` the parent's); return the processes."""
    tmp = tempfile.mkdtemp(prefix="localsgd-spawn-")
    atexit.register(shutil.rmtree, tmp, True)
    path = os.path.join(tmp, "call.pkl")
    import pickle

    with open(path, "wb") as f:
        pickle.dump(list(sys.path), f)
        pickle.dump((fn, tuple(args)), f)
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    return [Popen([sys.executable, "-c", _SPAWN_CODE, path, str(rank)], env=env) for rank in range(nprocs)]


def spawn(fn, args: tuple = (), nprocs: int = 1, timeout: float = 300) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)`` through the fork server: waits for every process; when one
    fails, kills the others and raises with its exit code (its traceback is on stderr, as with ``mp.spawn``)."""
    procs = spawn_processes(fn, args, nprocs)
    deadline = time.monotonic() + timeout
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                raise RuntimeError(f"process {failed[0][0]} terminated with exit code {failed[0][1]}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"spawn({fn})", timeout)
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


if __name__ == "__main__":
    _server_main(sys.argv[1])
