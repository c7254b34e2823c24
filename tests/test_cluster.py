"""`annotate run` against real Ray clusters started here, with token authentication on.

Every Ray process of these tests belongs to a ``ray start --block`` started in its own session
(:class:`RayNode`); stopping one signals that session and the workers its raylet started (they
run in sessions of their own), never ``ray stop``, which would stop every Ray on the machine.
The token is generated for the test with ``ray get-auth-token --generate`` under a temporary
HOME, and handed to Ray with ``RAY_AUTH_TOKEN_PATH``: the user's ``~/.ray`` is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]
#: How the CLI prints a failure: one line, exit code 1.
ERROR_PREFIX = "annotate: error: "
CARPHONE_FRAMES = 120


#: Every port :func:`free_port` handed out: ``bind(0)`` can return a port it returned a moment ago,
#: and two of a node's ports being one makes a Ray process die at start-up (and ``ray start --block``
#: then takes the whole node down).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, and never one this module handed out before."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Ray's workers run in sessions of their own, so a process
    group does not hold them; their parent, the raylet, does while it lives)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class NodeDown(Exception):
    """A Ray node of these tests went down (or never came up); the message is its log's tail."""


class RayNode:
    """One ``ray start --block`` (head or worker node) in its own session, with its own ports.

    ``--block`` watches the node's processes once a second and, when one exits unexpectedly,
    says which in its output (``log``) and kills the rest: a dead node is seen here as a dead
    ``ray start``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, hide: Path | None = None) -> None:
        self.log = log
        self._log_file = open(log, "wb")
        command = [RAY, "start", "--block", "--disable-usage-stats", *args]
        if hide is not None:  # a mount namespace of its own, an empty folder mounted over ``hide``
            empty = log.with_suffix(".empty")
            empty.mkdir()
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount --bind "$0" "$1" && shift && exec "$@"', str(empty), str(hide), *command]
        self.proc = subprocess.Popen(command, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close_log(self) -> None:
        self._log_file.close()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the node's output, without the terminal colours Ray's CLI logger puts in."""
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text(errors="replace"))[-chars:]

    def wait_started(self, timeout: float = 90) -> None:
        """Until ``ray start`` says the node runs (after it registered with the GCS)."""
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in self.log.read_bytes():
            if not self.alive() or time.monotonic() > deadline:
                self.kill()
                raise NodeDown(f"a Ray node did not come up:\n{self.log_tail()}")
            time.sleep(0.3)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the node and every process it started: as a machine going away would (SIGKILL), or
        with a grace period (SIGTERM, then SIGKILL)."""
        tree = descendants(self.proc.pid)
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig != signal.SIGKILL:
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            tree |= descendants(self.proc.pid)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in tree:  # the workers, each in its own session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.close_log()


class Cluster:
    """A token-mode Ray cluster on this machine: a head, and worker nodes added on demand.

    A head that goes down while it starts (a port another process took between :func:`free_port`
    and Ray's bind, say) is started again on fresh ports, up to ``START_ATTEMPTS`` times: that is
    this machine, not the code under test, and one such start must not fail the suite."""

    START_ATTEMPTS = 3
    #: How long a started head must stay up before a test gets it: ``--block`` notices a dead
    #: process within a second, so a process that died at start-up has taken the head down by then.
    SETTLE_S = 2.5

    def __init__(self, root: Path, token_file: Path, head_cpus: int, dashboard: bool) -> None:
        for attempt in range(1, self.START_ATTEMPTS + 1):
            try:
                self._start(root / f"start{attempt}", token_file, head_cpus, dashboard)
                return
            except NodeDown as down:
                if attempt == self.START_ATTEMPTS:
                    pytest.fail(f"the test cluster's head went down at start-up {attempt} times; the last:\n{down}")
                warnings.warn(f"the test cluster's head went down at start-up; starting it again:\n{down}")

    def _start(self, root: Path, token_file: Path, head_cpus: int, dashboard: bool) -> None:
        root.mkdir(parents=True)
        self.root = root
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: socket paths must fit
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        self.env = {**os.environ, **self.auth_env}
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = free_port() if dashboard else None
        dash = (["--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port)] if dashboard
                else ["--include-dashboard=false"])
        self.nodes = [RayNode(
            ["--head", "--port", str(self.port), "--node-ip-address", "127.0.0.1", "--num-cpus", str(head_cpus),
             "--temp-dir", str(self.temp_dir), "--ray-client-server-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()), *dash],
            self.env, root / "head.log")]
        try:
            self.nodes[0].wait_started()
            if dashboard:
                self._wait_for_dashboard()
            time.sleep(self.SETTLE_S)
            if not self.alive():
                raise NodeDown(self.diagnosis())
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return all(node.alive() for node in self.nodes)

    def diagnosis(self) -> str:
        """For a failure's message: nothing while every node runs, else each dead node's log tail
        (where ``--block`` names the Ray process that exited, and how)."""
        return "".join(f"\n--- {node.log.name} (the node is down) ---\n{node.log_tail()}"
                       for node in self.nodes if not node.alive())

    def add_node(self, cpus: int, hide: Path | None = None) -> RayNode:
        """A worker node; ``hide``: a folder its processes see empty (a share not mounted there)."""
        node = RayNode(
            ["--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
             "--temp-dir", str(self.temp_dir), "--dashboard-agent-listen-port", str(free_port())],
            self.env, self.root / f"node{len(self.nodes)}.log", hide)
        self.nodes.append(node)
        node.wait_started()
        return node

    def _wait_for_dashboard(self, timeout: float = 60) -> None:
        token = Path(self.auth_env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(f"http://127.0.0.1:{self.dashboard_port}/api/version",
                                         headers={"Authorization": f"Bearer {token}"})
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5):
                    return
            except OSError:
                if not self.nodes[0].alive():
                    raise NodeDown(self.diagnosis()) from None
                if time.monotonic() > deadline:
                    pytest.fail("the Ray dashboard (job server) did not come up")
                time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.proc.returncode is None:
                node.kill(signal.SIGTERM)
            else:  # it went down by itself (and took its processes with it): its pid may be another's now
                node.close_log()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token made the README's way, ``ray get-auth-token --generate``, under a temporary HOME."""
    home = tmp_path_factory.mktemp("home")
    # Without this process's own Ray auth settings: a local run earlier in the session (annotator.
    # cluster) sets RAY_AUTH_TOKEN here, and with it set Ray prints that token and writes no file.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    made = subprocess.run([RAY, "get-auth-token", "--generate"], env={**clean, "HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    path = home / ".ray" / "auth_token"
    assert path.read_text().strip() == made.stdout.strip() and len(made.stdout.strip()) >= 32
    return path


@pytest.fixture(scope="module")
def warm_models() -> None:
    """Models pulled once into the session's cache (conftest), so no worker converts them."""
    pulled = subprocess.run([sys.executable, "-m", "annotator", "models", "pull"], capture_output=True,
                            text=True, timeout=600)
    assert pulled.returncode == 0, pulled.stderr[-2000:]


T = TypeVar("T")


class Heads:
    """The module's token-mode head with its job server (dashboard) on, 2 CPUs, shared by its
    tests, and started again where one went down.

    No test here stops a cluster, nor does the code under test. A head that goes down anyway (this
    machine: CI saw one lose its raylet as the first test's driver registered, and the three tests
    after it fail on the dead head) is replaced, and the test it went down in runs once more on
    the new one, with the lost head's log in a warning. A head going down twice in one test fails it,
    with that log in the message.
    """

    def __init__(self, root: Callable[[], Path], token_file: Path) -> None:
        self._root = root
        self._token_file = token_file
        self.started: list[Cluster] = []

    def current(self) -> Cluster:
        if self.started and not self.started[-1].alive():
            self.started[-1].stop()
        if not self.started or not self.started[-1].alive():
            self.started.append(Cluster(self._root(), self._token_file, head_cpus=2, dashboard=True))
        return self.started[-1]

    def attempt(self, run: Callable[[Cluster], T]) -> tuple[Cluster, T]:
        """``run`` on the current head: (that head, what it returned), once more on a new head if
        the head went down meanwhile."""
        head = self.current()
        result = run(head)
        if head.alive():
            return head, result
        warnings.warn(f"the test cluster's head went down during a test; once more on a new head:{head.diagnosis()}")
        head = self.current()
        return head, run(head)

    def stop(self) -> None:
        for head in self.started:
            head.stop()


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory, token_file: Path, warm_models: None) -> Iterator[Heads]:
    keeper = Heads(lambda: tmp_path_factory.mktemp("cluster"), token_file)
    yield keeper
    keeper.stop()


def driver_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a driver on another machine: no Ray auth settings, an empty HOME
    (so no ``~/.ray/auth_token``), and whatever ``extra`` adds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), **extra}


def annotate(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "annotator", "run", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str, cluster: Cluster | None = None) -> str:
    """``done`` failed in one line, ``annotate: error: …``, holding every one of ``words``; a
    failed check's message carries ``cluster``'s diagnosis (a dead head's log)."""
    why = cluster.diagnosis() if cluster is not None else ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:] + why
    assert len(lines) == 1, done.stderr[-3000:] + why
    assert lines[0].startswith(ERROR_PREFIX), f"the CLI must print failures as {ERROR_PREFIX!r}…: {lines[0]}{why}"
    for word in words:
        assert word in lines[0], lines[0] + why
    return lines[0]


def test_run_joins_a_token_cluster_with_its_token(heads: Heads, carphone: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"

    def run(cluster: Cluster) -> subprocess.CompletedProcess[str]:
        shutil.rmtree(out, ignore_errors=True)
        # Only the token's file, as a node of the cluster would have it: the CLI turns token mode on.
        env = driver_env(tmp_path, RAY_AUTH_TOKEN_PATH=cluster.auth_env["RAY_AUTH_TOKEN_PATH"])
        return annotate(str(carphone), "--out", str(out), "--address", cluster.address, "--every-n", "4",
                        "--no-progress", env=env)

    cluster, done = heads.attempt(run)
    assert done.returncode == 0, done.stderr[-3000:] + cluster.diagnosis()
    assert "1 video (" in done.stdout and "30 frames" in done.stdout, done.stdout
    table = ds.dataset(out, format="parquet").to_table()
    assert sorted(set(table.column("frame_index").to_pylist())) == list(range(0, CARPHONE_FRAMES, 4))
    assert table.num_rows == 30  # carphone: one face in every frame
    assert set(table.column("video_path").to_pylist()) == {str(carphone)}
    assert "constructor arguments in the object store" not in done.stderr, done.stderr[-3000:]


def test_run_without_the_token_is_one_line(heads: Heads, carphone: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"

    def run(cluster: Cluster) -> tuple[subprocess.CompletedProcess[str], float]:
        started = time.monotonic()
        done = annotate(str(carphone), "--out", str(out), "--address", cluster.address, "--no-progress",
                        env=driver_env(tmp_path), timeout=120)
        return done, time.monotonic() - started

    cluster, (done, seconds) = heads.attempt(run)
    assert_one_line_error(done, cluster.address, "token", cluster=cluster)
    assert seconds < 30, "Ray's own retries (~15 s of warnings) were not cut short"
    assert not list(out.glob("part-*"))  # no video was started


def test_run_with_a_wrong_token_is_one_line(heads: Heads, carphone: Path, tmp_path: Path) -> None:
    cluster, done = heads.attempt(lambda cluster: annotate(
        str(carphone), "--out", str(tmp_path / "results"), "--address", cluster.address, "--no-progress",
        env=driver_env(tmp_path, RAY_AUTH_TOKEN="0" * 64), timeout=120))
    assert_one_line_error(done, "rejected", "token", cluster=cluster)


def test_ray_job_submit_as_the_readme_says(heads: Heads, carphone: Path, tmp_path: Path) -> None:
    """The README's job command, from the project root: the working directory is uploaded (with
    .gitignore applied, so no virtual environment), the job's driver joins with ``--address auto``."""
    out = tmp_path / "job-results"

    def submit(cluster: Cluster) -> subprocess.CompletedProcess[str]:
        shutil.rmtree(out, ignore_errors=True)
        env = {**driver_env(tmp_path), **cluster.auth_env}  # the README: the token and RAY_AUTH_MODE=token
        return subprocess.run(
            [RAY, "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard_port}", "--working-dir", ".",
             "--runtime-env-json", '{"excludes": [".git"]}', "--",
             "python", "-m", "annotator", "run", str(carphone), "--out", str(out), "--address", "auto",
             "--every-n", "4", "--no-progress"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=400)

    cluster, submitted = heads.attempt(submit)
    resources = cluster.temp_dir / "session_latest" / "runtime_resources"
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:] + cluster.diagnosis()
    assert "succeeded" in submitted.stdout + submitted.stderr
    table = ds.dataset(out, format="parquet").to_table()
    assert table.num_rows == 30
    assert sorted(set(table.column("frame_index").to_pylist())) == list(range(0, CARPHONE_FRAMES, 4))
    # What was uploaded: the project, without the virtual environments .gitignore names.
    uploaded = [pkg for pkg in (resources / "working_dir_files").iterdir() if pkg.is_dir()]
    assert uploaded and all((pkg / "annotator" / "cli.py").is_file() for pkg in uploaded), uploaded
    for pkg in uploaded:
        assert not any((pkg / name).exists() for name in (".venv", ".venv-ci", ".git")), sorted(pkg.iterdir())
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 64 * 2**20, f"{size / 2**20:.0f} MiB uploaded"


def test_a_job_driver_ships_no_second_copy_of_the_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Inside `ray job submit --working-dir .` our code is in the uploaded directory already, so
    the driver adds no py_modules (another ~11 MB); joining from anywhere else, it ships both."""
    from annotator.cluster import _project_modules

    # What Ray 2.60's job manager hands a job's driver (seen in a real job).
    job = ('{"runtime_env": {"excludes": [".git"], "working_dir": "gcs://_ray_pkg_caca76e1f2ac7f75.zip", '
           '"env_vars": {}}, "metadata": {"job_submission_id": "raysubmit_cj9RgkBDETDzfAfQ"}}')
    monkeypatch.chdir(REPO)
    assert [Path(m).name for m in _project_modules()] == ["annotator", "engines"]  # not in a job
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", job)
    assert _project_modules() == []
    monkeypatch.chdir(tmp_path)  # a job whose working directory is something else
    assert [Path(m).name for m in _project_modules()] == ["annotator", "engines"]


def test_a_plain_local_run_keeps_rays_noise_out(warm_models: None, carphone: Path, tmp_path: Path) -> None:
    """`annotate run CLIP --out X.parquet` on its own: no token warning, no core_worker.cc line, no
    token file written into HOME; the progress (status lines: stderr is no terminal here) and the
    summary still come through."""
    env = driver_env(tmp_path)
    done = annotate(str(carphone), "--out", str(tmp_path / "x.parquet"), "--every-n", "4", "--status-every", "1e-6",
                    env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "30 frames" in done.stdout
    assert "Token authentication" not in done.stderr, done.stderr[-3000:]
    assert "core_worker.cc" not in done.stderr and "constructor arguments" not in done.stderr, done.stderr[-3000:]
    assert "annotate: 1/1 videos (100.0 %), 30 frames" in done.stderr  # the status line passed the stderr filter
    assert not (Path(env["HOME"]) / ".ray").exists()  # a one-off token, none left in the user's home


def frames_of(table: pa.Table) -> dict[str, dict[tuple[int, int | None], dict]]:
    """Per video, its rows keyed by (frame, face), checking that no key comes twice."""
    videos: dict[str, dict[tuple[int, int | None], dict]] = {}
    for row in table.to_pylist():
        rows = videos.setdefault(row["video_path"], {})
        key = (row["frame_index"], row["face_index"])
        assert key not in rows, f"{row['video_path']}: frame {key} written twice"
        rows[key] = row
    return videos


def hosts_a_video_worker(node: RayNode) -> bool:
    """Whether one of the node's processes is an actor of our pool (Ray titles it after the class)."""
    for pid in descendants(node.proc.pid):
        try:
            if b"RayVideoWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def same_rows(got: dict[tuple[int, int | None], dict], want: dict[tuple[int, int | None], dict]) -> None:
    assert sorted(got, key=str) == sorted(want, key=str)
    for key, row in want.items():
        assert got[key]["expression"] == row["expression"], key
        for side in ("x1", "y1", "x2", "y2"):
            assert got[key][side] == pytest.approx(row[side], abs=1.0), (key, side)


def test_a_node_lost_mid_run_then_a_rerun_gives_every_frame_once(
        token_file: Path, warm_models: None, carphone: Path, tmp_path: Path) -> None:
    """Two nodes of one CPU each (so work lands on both); the second dies (SIGKILL to it and its
    workers, as a machine going away) once some videos are written and others are not. That run
    completes or fails in one line; a re-run of the same command then holds each video's frames
    exactly once: the rows of a run nobody interrupted."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        shutil.copyfile(carphone, videos / f"clip{i}.mp4")
    # What an uninterrupted run writes for one video: one copy, in this process (no Ray).
    reference = annotate(str(videos / "clip0.mp4"), "--out", str(tmp_path / "reference"), "--every-n", "2",
                         "--workers", "0", "--no-progress", env=driver_env(tmp_path))
    assert reference.returncode == 0, reference.stderr[-3000:]
    (want,) = frames_of(ds.dataset(tmp_path / "reference", format="parquet").to_table()).values()
    assert sorted({frame for frame, _ in want}) == list(range(0, CARPHONE_FRAMES, 2))

    # The head going down by itself (not the node this test kills) is this machine, as in Heads:
    # once more on a new cluster, with the lost head's log in a warning.
    for attempt in (1, 2):
        (tmp_path / f"cluster{attempt}").mkdir()
        cluster = Cluster(tmp_path / f"cluster{attempt}", token_file, head_cpus=1, dashboard=False)
        try:
            lose_a_node_then_rerun(cluster, videos, tmp_path / f"out{attempt}", want, tmp_path)
            return
        except (AssertionError, NodeDown):
            if attempt == 2 or cluster.nodes[0].alive():
                raise
            warnings.warn(f"the test cluster's head went down during the test; once more on a new cluster:"
                          f"{cluster.diagnosis()}")
        finally:
            cluster.stop()


def lose_a_node_then_rerun(cluster: Cluster, videos: Path, out: Path, want: dict, tmp_path: Path) -> None:
    """The body of the test above on ``cluster``: a run loses a node, a re-run completes the rows."""
    node = cluster.add_node(cpus=1)
    # Two workers of one CPU each: one on each node, whatever memory the machine has.
    command = [str(videos), "--out", str(out), "--address", cluster.address, "--every-n", "2", "--workers", "2",
               "--no-progress"]
    env = driver_env(tmp_path, RAY_AUTH_TOKEN_PATH=cluster.auth_env["RAY_AUTH_TOKEN_PATH"])
    with open(out.with_name(out.name + ".first.err"), "w+") as err:
        first = subprocess.Popen([sys.executable, "-m", "annotator", "run", *command], env=env, cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 240
        # Some videos written, others not, and the node hosting one of the pool's workers.
        while not (1 <= len(list(out.glob("part-*.parquet"))) < 4 and hosts_a_video_worker(node)):
            if first.poll() is not None:
                first_err = Path(err.name).read_text()
                raise AssertionError(f"the run ended before a node was lost: {first_err}{cluster.diagnosis()}")
            assert time.monotonic() < deadline, "no video was written in time" + cluster.diagnosis()
            time.sleep(0.1)
        node.kill()
        code = first.wait(timeout=300)
        err.seek(0)
        stderr = err.read()
    assert code == 0 or code == 1 and len(stderr.strip().splitlines()) == 1, stderr[-3000:] + cluster.diagnosis()
    if code == 1:
        assert stderr.startswith(ERROR_PREFIX) and "re-run" in stderr, stderr

    again = annotate(*command, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:] + cluster.diagnosis()
    got = frames_of(ds.dataset(out, format="parquet").to_table())
    assert sorted(got) == sorted(str(videos / f"clip{i}.mp4") for i in range(4))
    for rows in got.values():
        same_rows(rows, {key: {**row} for key, row in want.items()})


def test_a_head_lost_mid_run_ends_in_one_line_and_a_rerun_gives_every_frame_once(
        token_file: Path, warm_models: None, carphone: Path, tmp_path: Path) -> None:
    """The head (its GCS, raylet and workers) goes away once some videos are written and others
    are not. Left to Ray, the driver waited 60 s and was ended by Ray's core with a C++ line about
    the GCS; now it says in one line that the head is lost, what is kept and how to resume (exit 1,
    10 s before Ray would give up: 20 s here, so 10 s). A re-run on a new cluster completes every
    video, each frame once."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        shutil.copyfile(carphone, videos / f"clip{i}.mp4")
    out = tmp_path / "out"
    (tmp_path / "lost").mkdir()
    cluster = Cluster(tmp_path / "lost", token_file, head_cpus=1, dashboard=False)
    try:
        env = driver_env(tmp_path, RAY_AUTH_TOKEN_PATH=cluster.auth_env["RAY_AUTH_TOKEN_PATH"],
                         RAY_gcs_rpc_server_reconnect_timeout_s="20")
        command = [str(videos), "--out", str(out), "--every-n", "2", "--no-progress"]
        with open(tmp_path / "first.err", "w+") as err:
            first = subprocess.Popen([sys.executable, "-m", "annotator", "run", *command, "--workers", "1",
                                      "--address", cluster.address],
                                     env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.monotonic() + 240
            while not 1 <= len(list(out.glob("part-*.parquet"))) < 4:
                assert first.poll() is None, Path(err.name).read_text() + cluster.diagnosis()
                assert time.monotonic() < deadline, "no video was written in time" + cluster.diagnosis()
                time.sleep(0.1)
            lost_at = time.monotonic()
            cluster.nodes[0].kill()
            code = first.wait(timeout=120)
            waited = time.monotonic() - lost_at
            err.seek(0)
            lines = err.read().strip().splitlines()
    finally:
        cluster.stop()
    assert code == 1, lines
    assert lines[-1].startswith(f"{ERROR_PREFIX}lost the Ray cluster's head: its GCS at ") and \
        f"what is finished is kept in {out}, re-run the same command to resume" in lines[-1], lines
    assert not any("Failed to connect to GCS" in line for line in lines), lines  # Ray's own ending came not
    assert 8 <= waited < 19, waited  # silence counts from the last answer, up to 2 s before the loss
    kept = len(list(out.glob("part-*.parquet")))  # whole parts only: one in writing is a dot-file
    assert kept >= 1

    again = annotate(*command, "--workers", "0", env=driver_env(tmp_path), timeout=300)  # resumes, here without Ray
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"({kept} already done, 0 failed)" in again.stdout, again.stdout
    assert not list(out.glob(".*.tmp"))  # a part the lost run was writing is written again, whole
    got = frames_of(ds.dataset(out, format="parquet").to_table())
    assert sorted(got) == sorted(str(videos / f"clip{i}.mp4") for i in range(4))
    assert all(sorted({frame for frame, _ in rows}) == list(range(0, CARPHONE_FRAMES, 2)) for rows in got.values())


def _why_no_mount_namespace() -> str | None:
    """Why a Ray node cannot be given a folder hidden from it here, or None if it can."""
    try:
        tried = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                               text=True, timeout=30)
    except FileNotFoundError:
        return "no unshare (util-linux) on this machine: a node cannot be given a mount of its own"
    if tried.returncode != 0:
        return (f"unshare --mount is refused here ({tried.stderr.strip()}): a mount namespace needs root "
                "or CAP_SYS_ADMIN")
    return None


@pytest.mark.skipif(_why_no_mount_namespace() is not None, reason=str(_why_no_mount_namespace()))
def test_a_node_that_cannot_see_the_videos_gets_none_of_them(token_file: Path, warm_models: None, carphone: Path,
                                                              tmp_path: Path) -> None:
    """A node whose processes see the videos' folder empty (the share not mounted there): before,
    it failed each video it was given in a millisecond and took the next, so the run ended with
    most videos failed (7 of 8 tried by hand). Now: alone, the run stops in one line that says
    why; beside a node that sees them, its first video goes to that node, it is benched, and
    every video is annotated, each frame once."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(8):
        shutil.copyfile(carphone, videos / f"clip{i}.mp4")
    cluster = Cluster(tmp_path / "cluster", token_file, head_cpus=0, dashboard=False)
    env = driver_env(tmp_path, RAY_AUTH_TOKEN_PATH=cluster.auth_env["RAY_AUTH_TOKEN_PATH"])
    try:
        cluster.add_node(cpus=1, hide=videos)
        alone = annotate(str(videos), "--out", str(tmp_path / "alone"), "--address", cluster.address,
                         "--workers", "1", "--no-progress", env=env)
        line = assert_one_line_error(alone, "no Ray worker can open the videos this machine reads: node ",
                                     f"cannot open {videos}/clip", "(No such file or directory)",
                                     "a path that every node mounts", cluster=cluster)
        assert not list((tmp_path / "alone").glob("*.parquet")), line  # no video recorded as failed
        cluster.add_node(cpus=1)
        both = annotate(str(videos), "--out", str(tmp_path / "both"), "--address", cluster.address,
                        "--workers", "2", "--no-progress", env=env)
    finally:
        cluster.stop()
    assert both.returncode == 0, both.stderr[-3000:]
    summary = both.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"{tmp_path / 'both'}: 8 videos (0 already done, 0 failed), 960 frames, 960 faces"), summary
    (benched,) = [line for line in both.stderr.splitlines() if "cannot open" in line]
    assert "(No such file or directory), which this machine reads: are the videos mounted there" in benched
    got = frames_of(ds.dataset(tmp_path / "both", format="parquet").to_table())
    assert sorted(got) == sorted(str(videos / f"clip{i}.mp4") for i in range(8))
    assert all(len(rows) == CARPHONE_FRAMES for rows in got.values())


#: Videos of the run a node joins: about 30 s of one worker's time on a fast host.
VIDEOS_TO_JOIN = 60


def test_a_node_that_joins_mid_run_gets_workers(token_file: Path, warm_models: None, carphone: Path,
                                                tmp_path: Path) -> None:
    """A run sized to a 1-CPU cluster; a second node joins once videos are being written (added
    by hand, or by Ray's autoscaler). Before, the pool kept its one worker to the end; now it
    grows onto the new node, and every video is annotated once."""
    videos = tmp_path / "videos"
    videos.mkdir()
    # Enough work that the run outlasts the pool's next look at the cluster (every 10 s) and the
    # new worker's start: 24 videos were done first on a fast host.
    for i in range(VIDEOS_TO_JOIN):
        shutil.copyfile(carphone, videos / f"clip{i:02d}.mp4")
    out = tmp_path / "out"
    cluster = Cluster(tmp_path / "cluster", token_file, head_cpus=1, dashboard=False)
    env = driver_env(tmp_path, RAY_AUTH_TOKEN_PATH=cluster.auth_env["RAY_AUTH_TOKEN_PATH"])
    try:
        with open(tmp_path / "run.err", "w+") as err:
            run = subprocess.Popen([sys.executable, "-m", "annotator", "-v", "run", str(videos), "--out", str(out),
                                    "--address", cluster.address, "--no-progress"], env=env, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=err, text=True)
            deadline = time.monotonic() + 240
            while not list(out.glob("part-*.parquet")):
                assert run.poll() is None, Path(err.name).read_text()[-3000:] + cluster.diagnosis()
                assert time.monotonic() < deadline, "no video was written in time" + cluster.diagnosis()
                time.sleep(0.1)
            node = cluster.add_node(cpus=1)
            joined = False
            while run.poll() is None and not joined:
                joined = hosts_a_video_worker(node)
                time.sleep(0.2)
            stdout, _ = run.communicate(timeout=300)
            err.seek(0)
            stderr = err.read()
    finally:
        cluster.stop()
    assert run.returncode == 0, stderr[-3000:]
    assert joined, f"the node that joined never got a worker before the run ended:\n{stderr[-3000:]}"
    assert "the cluster has grown: 1 more worker" in stderr
    assert stdout.strip().splitlines()[-1].startswith(
        f"{out}: {VIDEOS_TO_JOIN} videos (0 already done, 0 failed), {VIDEOS_TO_JOIN * CARPHONE_FRAMES:,} frames")
    got = frames_of(ds.dataset(out, format="parquet").to_table())
    assert len(got) == VIDEOS_TO_JOIN and all(len(rows) == CARPHONE_FRAMES for rows in got.values())
