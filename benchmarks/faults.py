"""The fault table: a demo-sized one-trial sweep, undisturbed and with each fault injected.

    python benchmarks/faults.py [--iterations 400] [--cases worker_kill,reservoir_kill,...]

Cases (all real faults, on a local Ray and an MLflow SQLite store in a temporary directory):
- ``worker_kill``     SIGKILL of the trial's worker process mid-run; Tune retries the trial
                      from its last checkpoint (engine.trainable's ``_fault_kill_at`` hook).
- ``reservoir_kill``  SIGKILL of the node's reservoir actor process mid-run (the actor restarts empty).
- ``driver_sigint``   SIGINT of ``python -m engine.sweep`` while the trial is mid-run, then ``--resume``.
- ``driver_kill9``    SIGKILL of the driver while the trial is mid-run (its Ray processes are then
                      killed too, as a lost head node would be), then ``--resume`` on a fresh Ray.
- ``tracking_outage`` a real ``mlflow server`` on 127.0.0.1, stopped once the member's first metrics
                      are in, kept down ``--outage-s`` seconds (default 300), restarted on the same
                      port; the sweep goes on and the driver writes what it held when the store returns.
For each: the outcome, whether every train metric and every entropy value (every log step) equals the
undisturbed run (entropy to 1e-12 relative), and whether any metric has a step twice. The tests in
tests/test_faults_entropy.py assert the same on the same harness.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "grids" / "demo.yaml"
# windows longer than the gap between log steps, so that a restored trial needs snapshots taken before
# its checkpoint (two estimators: consecutive k-NN and a strided KL window)
ENTROPY = ("entropy=[{name: knn, window: 70, stride: 1, ks: [1, 5, 19]}, "
           "{name: kl, window: 15, stride: 3}]")
FAULT_AT = 130
CASES = ("worker_kill", "reservoir_kill", "driver_sigint", "driver_kill9", "tracking_outage")
INJECTED = {
    "worker_kill": f"SIGKILL of the trial worker at the first report at iteration ≥ {FAULT_AT}",
    "reservoir_kill": f"SIGKILL of the reservoir actor at the first report at iteration ≥ {FAULT_AT}",
    "driver_sigint": f"SIGINT of the driver with the trial held after a checkpoint at ≥ {FAULT_AT}; --resume",
    "driver_kill9": f"SIGKILL of the driver (and its Ray) with the trial held at ≥ {FAULT_AT}; --resume",
    "tracking_outage": "mlflow server stopped after the first logged metrics, down OUTAGE s, restarted",
}

DRIVER = """
import sys
sys.path.insert(0, {repo!r})
import engine.trainable
from benchmarks.faults import with_fault
engine.trainable.train_bundle = with_fault(engine.trainable.train_bundle, {fault!r}, {records!r})
from engine.sweep import main
sys.exit(main(sys.argv[1:]))
"""


def overrides(experiment: str, iterations: int) -> list[str]:
    return [f"experiment={experiment}", "width=1", "num_stoch_grads=2", "batch_size=32", "lr=0.1",
            f"iterations={iterations}", "log_schedule=every:20", "checkpoint_every=60", "max_failures=2",
            ENTROPY]


def with_fault(train_bundle, fault: dict, record_dir: str):
    """The trainable with ``_fault_kill_at`` set in its config (the CLI has no such flag); each start
    writes ``record_dir/<pid>.restored`` or ``.fresh`` (was it restored from a checkpoint?)."""
    def faulty(config):
        import os as _os

        from ray import tune as _tune

        kind = "restored" if _tune.get_checkpoint() is not None else "fresh"
        open(_os.path.join(record_dir, f"{_os.getpid()}.{kind}"), "w").close()
        return train_bundle({**config, "_fault_kill_at": fault})
    return faulty


def member_histories(uri: str, experiment: str) -> tuple[dict, dict]:
    """({metric: [(step, value)]}, tags) of the single member run of ``experiment``."""
    from mlflow.tracking import MlflowClient

    from engine import layout

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get(layout.TAG_ROLE) == layout.ROLE_MEMBER]
    assert len(runs) == 1, f"{experiment}: expected one member run, found {len(runs)}"
    run = runs[0]
    hist = {name: sorted(((m.step, m.value) for m in c.get_metric_history(run.info.run_id, name)),
                         key=lambda sv: sv[0])
            for name in run.data.metrics}
    return hist, dict(run.data.tags)


def is_entropy(name: str) -> bool:
    return name.startswith("entropy") or name == "window_radius"


def compare(clean: dict, faulty: dict) -> dict:
    """Per kind (train, entropy): names whose histories differ; and names with a repeated step."""
    def differs(name):
        a, b = clean.get(name, []), faulty.get(name, [])
        if [s for s, _ in a] != [s for s, _ in b]:
            return True
        if not is_entropy(name):
            return a != b
        return any(not math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12) for (_, x), (_, y) in zip(a, b))
    names = set(clean) | set(faulty)
    return {"train": sorted(n for n in names if not is_entropy(n) and differs(n)),
            "entropy": sorted(n for n in names if is_entropy(n) and differs(n)),
            "duplicates": sorted(n for n, h in faulty.items() if len({s for s, _ in h}) != len(h))}


def run_in_process(experiment: str, fault, uri: str, storage: str, iterations: int) -> dict:
    """One sweep in this process (Ray started here if needed); returns run_sweep's summary."""
    from engine.grid import load_grid
    from engine.sweep import run_sweep

    grid = load_grid(DEMO, overrides=overrides(experiment, iterations))
    return run_sweep(grid, tracking_uri=uri, storage_path=storage, verbose=0, _fault_kill_at=fault)


def _env(ray_tmp: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["RAY_TMPDIR"] = ray_tmp
    env.pop("RAY_ADDRESS", None)
    return env


def run_driver_fault(experiment: str, sig: int, uri: str, storage: str, work: str, iterations: int,
                     ray_tmp: tuple[str, str], deadline_s: float = 300.0) -> dict:
    """``python -m engine.sweep`` in a subprocess; ``sig`` to it once its trial holds after a checkpoint
    at ≥ FAULT_AT; then ``--resume`` (in a new Ray). Returns both return codes and outputs."""
    marker = Path(work) / f"{experiment}.held"
    script = Path(work) / f"{experiment}_driver.py"
    records = Path(work) / f"{experiment}_starts"
    records.mkdir()
    script.write_text(DRIVER.format(repo=str(REPO), fault={"hold": {"at": FAULT_AT, "marker": str(marker)}},
                                    records=str(records)))
    args = [sys.executable, str(script), str(DEMO), "--num-cpus", "2", "--num-gpus", "0", "--tracking-uri", uri,
            "--storage-path", storage, "--verbose", "0",
            *(a for s in overrides(experiment, iterations) for a in ("--set", s))]
    proc = subprocess.Popen(args, cwd=work, env=_env(ray_tmp[0]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        end = time.monotonic() + deadline_s
        while not marker.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.2)          # polling interval, not synchronisation
        if not marker.exists():
            raise RuntimeError(f"{experiment}: the trial never reached iteration {FAULT_AT}:\n"
                               + (proc.communicate(timeout=60)[0] if proc.poll() is not None else "")[-3000:])
        proc.send_signal(sig)
        first_out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if sig == signal.SIGKILL:
            # what the driver started (its local Ray, the held worker) dies with it, as with a lost head
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    resumed = subprocess.run(args + ["--resume"], cwd=work, env=_env(ray_tmp[1]), capture_output=True,
                             text=True, timeout=600, start_new_session=True)
    return {"first_rc": proc.returncode, "first_out": first_out, "rc": resumed.returncode,
            "out": resumed.stdout + resumed.stderr, "held_at": int(marker.read_text()),
            "starts": sorted(p.suffix[1:] for p in records.iterdir())}


class MlflowServer:
    """A real tracking server on 127.0.0.1 with a SQLite store under ``root``; stop/start keep the port."""

    def __init__(self, root: Path, port: int, env: dict | None = None):
        self.root, self.port, self.proc, self.env = Path(root), port, None, env
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited:\n" + (self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                        self.uri + "/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        return
            except OSError:
                pass
            time.sleep(0.2)          # polling interval, not synchronisation
        raise RuntimeError("mlflow server did not come up:\n" + (self.root / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)         # the server and its own workers, ours only
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None

    def down(self) -> bool:
        """Nothing accepts connections on the port."""
        import socket
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return False
        except OSError:
            return True


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_metrics(uri: str, experiment: str) -> bool:
    from mlflow.tracking import MlflowClient

    from engine import layout

    try:
        c = MlflowClient(tracking_uri=uri)
        exp = c.get_experiment_by_name(experiment)
        return exp is not None and any(r.data.metrics for r in c.search_runs([exp.experiment_id], max_results=10)
                                       if r.data.tags.get(layout.TAG_ROLE) == layout.ROLE_MEMBER)
    except Exception:        # noqa: BLE001 - the server is starting or busy: ask again
        return False


def run_tracking_outage(experiment: str, work: str, iterations: int, ray_tmp: str, outage_s: float) -> dict:
    """``python -m engine.sweep`` against a real tracking server that is stopped once the member's first
    metrics are in and restarted ``outage_s`` seconds later on the same port. The driver is told to wait
    for the store at the end for longer than the outage (else it would spill to a file, also a valid
    outcome, but not this case's). Returns the server's URI, the exit code and the driver's output."""
    root = Path(work) / f"{experiment}_server"
    root.mkdir()
    env = _env(ray_tmp)
    srv = MlflowServer(root, free_port(), env=env)
    srv.start()
    env["THERMOSWEEP_TRACKING_END_WAIT_S"] = str(int(outage_s + 600))
    args = [sys.executable, "-m", "engine.sweep", str(DEMO), "--num-cpus", "2", "--num-gpus", "0",
            "--tracking-uri", srv.uri, "--storage-path", f"{work}/rr_{experiment}", "--verbose", "0",
            *(a for s in overrides(experiment, iterations) for a in ("--set", s))]
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        end = time.monotonic() + 600
        while not _has_metrics(srv.uri, experiment) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.5)          # polling interval, not synchronisation
        if proc.poll() is not None:
            raise RuntimeError(f"{experiment}: the sweep ended before any metric reached the server:\n"
                               + proc.communicate()[0][-3000:])
        srv.stop()
        down_at = time.monotonic()
        time.sleep(outage_s)         # the outage itself: its length is what this case measures
        running_at_restart = proc.poll() is None
        srv.start()
        out, _ = proc.communicate(timeout=outage_s + 1200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"uri": srv.uri, "server": srv, "rc": proc.returncode, "out": out, "down_s": time.monotonic() - down_at,
            "running_at_restart": running_at_restart}


def row(case: str, injected: str, outcome: str, clean: dict, hist: dict, tags: dict) -> dict:
    """One line of the fault table: the fault's run compared with the undisturbed one."""
    from engine import layout

    d = compare(clean, hist)
    return {"case": case, "injected": injected, "outcome": f"{outcome}; status {tags.get(layout.TAG_STATUS)}",
            "train": "y" if not d["train"] else f"n {d['train']}",
            "entropy": "y" if not d["entropy"] else f"n {d['entropy']}",
            "dup": "n" if not d["duplicates"] else f"y {d['duplicates']}"}


def table(rows: list[dict]) -> str:
    head = ("case", "injected", "outcome", "train identical", "entropy identical", "duplicate steps")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        lines.append(" | ".join(str(r[k]) for k in ("case", "injected", "outcome", "train", "entropy", "dup")))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=400)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--outage-s", type=float, default=300.0, help="tracking_outage: seconds the server is down")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; choose from {', '.join(CASES)}")
    os.environ["PYTHONPATH"] = _env("")["PYTHONPATH"]
    work = tempfile.mkdtemp(prefix="faults-")
    uri, storage = f"sqlite:///{work}/mlflow.db", f"{work}/rr"
    base = os.environ.get("RAY_TMPDIR", "/tmp")
    t0 = time.monotonic()
    run_in_process("clean", None, uri, storage, args.iterations)
    clean, _ = member_histories(uri, "clean")
    rows = []
    for case in cases:
        if case == "tracking_outage":
            r = run_tracking_outage(case, work, args.iterations, f"{base}/outage", args.outage_s)
            try:
                hist, tags = member_histories(r["uri"], case)
            finally:
                r["server"].stop()
            said = sum("tracking:" in line for line in r["out"].splitlines())
            outcome = (f"exit {r['rc']}, store down {r['down_s']:.0f} s, driver still running at the restart: "
                       f"{'y' if r['running_at_restart'] else 'n'}, {said} tracking message(s)")
            rows.append(row(case, INJECTED[case].replace("OUTAGE", f"{args.outage_s:g}"), outcome, clean, hist, tags))
            continue
        if case in ("worker_kill", "reservoir_kill"):
            fault = {"worker": FAULT_AT} if case == "worker_kill" else {"reservoir": FAULT_AT}
            s = run_in_process(case, fault, uri, storage, args.iterations)
            outcome = f"members {s['members']}"
        else:
            sig = signal.SIGINT if case == "driver_sigint" else signal.SIGKILL
            r = run_driver_fault(case, sig, uri, storage, work, args.iterations,
                                 (f"{base}/{case[7:]}a", f"{base}/{case[7:]}b"))
            outcome = (f"held at {r['held_at']}, first exit {r['first_rc']}, --resume exit {r['rc']}, "
                       f"trial starts {r['starts']}")
        hist, tags = member_histories(uri, case)
        rows.append(row(case, INJECTED[case], outcome, clean, hist, tags))
    n_entropy = sum(len(h) for n, h in clean.items() if is_entropy(n))
    print(f"{args.iterations} iterations, log every 20, checkpoint every 60, {n_entropy} entropy points "
          f"in the undisturbed run; {time.monotonic() - t0:.0f} s in all (work dir {work})\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
