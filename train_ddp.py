"""
Data-parallel (DDP) or sharded (FSDP2, --fsdp=True) training: train.py's loop in several processes.

    torchrun --standalone --nproc_per_node=4 train_ddp.py config/shakespeare_moe.py
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_ddp.py ...

gradient_accumulation_steps counts micro-batches over all processes, as in train.py: each of the W
processes takes its own gradient_accumulation_steps / W of every global batch, so the run sees the
tokens train.py sees with the same config, and can resume with another number of processes. Left at its
default, it becomes the smallest multiple of W (one micro-batch each); set, it must be a multiple of W.
Rank 0 alone prints, samples, writes metrics and checkpoints (full state dicts, which train.py and
sample.py load). With torchrun --max-restarts=N a restarted run resumes from out_dir/ckpt.pt.
"""
import os
import sys
from datetime import timedelta

import common  # noqa: F401 (first, so that a Ctrl-C during the slow imports below is one line: common.interrupted)

import torch
import torch.distributed as dist

from configurator import configure
from train import DEFAULTS, INTERRUPTED, RULES, SOURCES, World, process_start, train


BROKEN = ('peer', 'remote worker', 'Timed out', 'timed out', 'Connection')  # what a broken collective says


class DataParallel(World):
    """This process's place among the torchrun processes, and how they share the work."""

    def __init__(self, backend):
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ['LOCAL_RANK'])
        self.device = f'cuda:{local_rank}' if backend == 'nccl' else 'cpu'
        self.model = None

    def wrap(self, model, c):
        if c.fsdp:  # one FSDP unit per block: each block's parameters are gathered only while it runs
            from torch.distributed.fsdp import fully_shard
            for block in [*model.layers, *model.mtp]:
                fully_shard(block)
            self.model = fully_shard(model)
        else:
            from torch.nn.parallel import DistributedDataParallel
            # DSA's warm-up trains only the indexers: the other parameters get no gradient in those steps
            self.model = DistributedDataParallel(model, device_ids=[torch.device(self.device)] if self.device != 'cpu' else None,
                                                 find_unused_parameters=bool(c.index_warmup))
        return self.model

    def grad_sync(self, on):
        if hasattr(self.model, 'set_requires_gradient_sync'):  # FSDP2
            self.model.set_requires_gradient_sync(on)
        else:  # what DDP's no_sync() context sets
            self.model.require_backward_grad_sync = on

    def all_reduce(self, t):
        dist.all_reduce(t)
        return t


def main(argv):
    started = process_start()  # max_time counts from here
    config, explicit = configure(DEFAULTS, argv, __doc__, SOURCES, RULES)  # --help and bad options need no torchrun
    if 'RANK' not in os.environ or 'LOCAL_RANK' not in os.environ:
        print("train_ddp.py runs under torchrun, e.g.: torchrun --standalone --nproc_per_node=2 train_ddp.py "
              f"{' '.join(argv) or 'config/shakespeare_moe.py'}  (one process: python train.py)", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)) > 0 and not config['resume']:
        config['resume'] = 'auto'  # torchrun restarted us after a failure: continue from the last checkpoint
        explicit['resume'] = 'a torchrun restart'
    cuda = torch.cuda.is_available() and not config['device'].startswith('cpu')
    if cuda:
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    else:  # the processes share this machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
    backend, timeout = 'nccl' if cuda else 'gloo', timedelta(seconds=config['ddp_timeout'])
    # after a torchrun restart the store still holds the failed attempt's addresses: keep each attempt's apart
    store, rank, world_size = next(dist.rendezvous('env://', timeout=timeout))
    store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    try:
        train(config, explicit, DataParallel(backend), started)
        # A gloo worker thread frees a finished collective's tensors a moment after the caller resumes, and needs
        # the GIL for it: a rank that exits at once can abort ("terminate called without an active exception").
        # Waiting here, GIL released, for every rank to finish lets those threads drain first.
        dist.barrier()
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or any(w in str(e) for w in BROKEN)):
            raise
        # another rank failed (its traceback is its own), was stopped or killed: the collectives broke or timed out.
        # Exit at once (os._exit skips the finally): tearing down a process group with a collective in flight can
        # hang or abort (FSDP: SIGABRT).
        print(f"error: rank {dist.get_rank()}: stopping, another process failed or stopped answering: "
              f"{str(e).splitlines()[0][:200]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    finally:
        dist.destroy_process_group()


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # while the processes meet, or a second Ctrl-C
        sys.exit(INTERRUPTED)
