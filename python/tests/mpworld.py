"""A pool of worker processes, one per rank, that run test scenarios together.

`World(nranks, mode, device)` spawns the ranks once; `world.run(name, **kw)`
makes every rank call `name(ctx, **kw)` from the scenario module of its mode
and raises with every failing rank's traceback. Workers stay up between
tests (importing torch and joining a group costs seconds), and a world whose
scenario timed out is torn down so that the next test starts clean.

Modes:
  "torch": torch.distributed, gloo on CPU or nccl on CUDA (one GPU per rank);
           scenarios from scenarios_torch.py.
  "raw":   no torch; ctx.allgather(bytes) -> [bytes] goes through this
           process; scenarios from scenarios_raw.py.
"""

import faulthandler
import importlib
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
import traceback


class Skip(Exception):
    """Raised by a scenario (on every rank) to skip the test with a reason."""


class Ctx:
    """What a scenario gets: rank, nranks, device, and the mode's group."""

    def __init__(self, rank, nranks, device):
        self.rank, self.nranks, self.device = rank, nranks, device
        self.group = None
        self.allgather = None


def _worker(rank, nranks, mode, device, store, cmd_q, res_q, reply_q, env):
    os.environ.update(env)
    # A scenario that hangs gets its stacks dumped (to stderr) before the kill.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ctx = Ctx(rank, nranks, device)
    try:
        if mode == "torch":
            import torch
            import torch.distributed as dist
            if device == "cuda":
                torch.cuda.set_device(rank % torch.cuda.device_count())
            dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                    init_method="file://" + store, rank=rank,
                                    world_size=nranks)
            ctx.group = dist.group.WORLD
        else:
            def allgather(data):
                res_q.put(("ag", rank, bytes(data)))
                return reply_q.get()
            ctx.allgather = allgather
        mod = importlib.import_module("scenarios_torch" if mode == "torch" else "scenarios_raw")
        res_q.put(("ready", rank, None))
    except BaseException:
        res_q.put(("ready", rank, traceback.format_exc()))
        return
    while True:
        cmd = cmd_q.get()
        if cmd is None:
            break
        name, kwargs = cmd
        try:
            getattr(mod, name)(ctx, **kwargs)
            res_q.put(("done", rank, None))
        except Skip as e:
            res_q.put(("done", rank, "SKIP: " + str(e)))
        except BaseException:
            res_q.put(("done", rank, traceback.format_exc()))
    if mode == "torch":
        import torch.distributed as dist
        dist.destroy_process_group()


class World:
    def __init__(self, nranks, mode="torch", device="cpu", env=None, start_timeout=180):
        self.nranks, self.mode, self.device = nranks, mode, device
        self.broken = False
        ctx = mp.get_context("spawn")
        self._tmp = tempfile.TemporaryDirectory(prefix="epx-world-")
        store = os.path.join(self._tmp.name, "store")
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(nranks)]
        self.reply_qs = [ctx.Queue() for _ in range(nranks)]
        env = dict(env or {})
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, nranks, mode, device, store, self.cmd_qs[r], self.res_q,
                                        self.reply_qs[r], env))
                      for r in range(nranks)]
        for p in self.procs:
            p.start()
        errors = self._collect("ready", start_timeout)
        if errors:
            self.close()
            raise RuntimeError("world start failed:\n" + "\n".join(errors))

    def _collect(self, kind, timeout):
        deadline = time.monotonic() + timeout
        done, errors, gather = set(), [], {}
        while len(done) < self.nranks:
            left = deadline - time.monotonic()
            if left <= 0:
                self.broken = True
                for p in self.procs:
                    if p.is_alive():
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(1)
                missing = sorted(set(range(self.nranks)) - done)
                raise TimeoutError(f"ranks {missing} did not finish within {timeout}s "
                                   f"(finished: {sorted(done)}); errors so far:\n" +
                                   "\n".join(errors))
            try:
                msg, rank, payload = self.res_q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in done]
                if dead:
                    self.broken = True
                    raise RuntimeError(f"ranks {dead} died; errors so far:\n" + "\n".join(errors))
                continue
            if msg == "ag":
                gather[rank] = payload
                if len(gather) == self.nranks:
                    parts = [gather[r] for r in range(self.nranks)]
                    for q in self.reply_qs:
                        q.put(parts)
                    gather = {}
                continue
            if msg != kind:
                continue
            done.add(rank)
            if payload is not None:
                errors.append(f"--- rank {rank} ---\n{payload}")
        return errors

    def run(self, name, timeout=None, **kwargs):
        if timeout is None:
            timeout = float(os.environ.get("EPX_TEST_SCENARIO_TIMEOUT", "240"))
        if self.broken:
            raise RuntimeError("world is broken")
        for q in self.cmd_qs:
            q.put((name, kwargs))
        errors = self._collect("done", timeout)
        skips = [e for e in errors if e.split("\n", 1)[-1].startswith("SKIP: ")]
        if errors and len(skips) == len(errors) == self.nranks:
            import pytest
            pytest.skip(skips[0].split("SKIP: ", 1)[1])
        if errors:
            raise AssertionError(f"scenario {name} failed on {len(errors)} rank(s):\n" +
                                 "\n".join(errors))

    def close(self):
        for q in self.cmd_qs:
            try:
                q.put(None)
            except Exception:
                pass
        deadline = time.monotonic() + 15
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._tmp.cleanup()
