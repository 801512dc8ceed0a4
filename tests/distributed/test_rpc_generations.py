"""What torch RPC allows across generations in one process, which is why a worker's state sits behind one
process-wide slot (``worker_host.PROCESS_WORKER``) rather than in an object the coordinator reaches through an RRef
(docs/architecture.md, "Process state"): two ranks start RPC twice, as ChatLoop's generations do
(``init_rpc_generation``); a call by function name works in both, an RRef made in the second does not.

If the RRef check starts passing, torch no longer binds its RRef machinery to a process's first agent: a worker's
``WorkerHost`` could then be created with ``rpc.remote`` and reached through its RRef, and the slot could go."""

from __future__ import annotations

import subprocess
import sys

from chatloop.network import free_port

RANK = r'''
import os, sys
import torch.distributed.rpc as rpc
from chatloop.runtime.rendezvous import Rendezvous, init_rpc_generation, shutdown_rpc


class Box:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


rank, port = int(sys.argv[1]), int(sys.argv[2])
store = (Rendezvous.host("127.0.0.1", port, 60) if rank == 0 else Rendezvous.join("127.0.0.1", port, 60))
for generation in range(2):
    init_rpc_generation(f"rank{rank}", rank, 2, generation, store, rpc.TensorPipeRpcBackendOptions(rpc_timeout=20))
    if rank == 0:
        by_name = rpc.rpc_sync("rank1", os.getpid, timeout=10) > 0
        try:
            rref = rpc.remote("rank1", Box, args=(generation,))
            through_rref = f"ok {rref.rpc_sync(timeout=10).get()}"
            del rref
        except Exception as e:
            through_rref = "failed: " + str(e).replace(chr(10), " ")[:300]
        print(f"generation {generation}: by name {by_name}; rref {through_rref}", flush=True)
        store.end(generation)
    else:
        store.wait_end(generation, poll_s=0.05)
    shutdown_rpc(graceful=False)
'''


def test_a_call_by_name_lives_through_generations_and_an_rref_does_not():
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        out, err = ranks[0].communicate(timeout=180)
        ranks[1].communicate(timeout=30)
    finally:
        for rank in ranks:
            rank.kill()
    lines = [line for line in out.splitlines() if line.startswith("generation")]
    assert lines[0] == "generation 0: by name True; rref ok 0", (out, err[-2000:])
    assert lines[1].startswith("generation 1: by name True; rref failed:"), (
        "an RRef made in a later generation works now: see this module's docstring", out, err[-2000:])
    assert "RPC is no longer running" in lines[1], lines[1]
