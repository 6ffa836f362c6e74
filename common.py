"""
What every script shares: the one-line error, device and dtype choice, atomic writes and peak FLOPs.
torch is imported inside the functions that need it, so that prepare.py starts without it.
"""
import os
import sys
from contextlib import nullcontext

# bf16/fp16 dense tensor-core peaks (vendor datasheets), matched in the CUDA device name, for MFU
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'L4': 121e12, 'A10': 125e12,
              '4090': 165e12, 'V100': 125e12, 'T4': 65e12}
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def fail(msg):
    """Bad input: one clear line on stderr and exit status 2, never a traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def interrupted(kind, value, traceback, default=sys.excepthook):
    """sys.excepthook: a Ctrl-C that nothing caught (say during `import torch`, which every script but prepare.py
    starts with) is one line, not a traceback; Python then still ends the process by SIGINT (status 130)."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted (Ctrl-C): stopped", file=sys.stderr)
    else:
        default(kind, value, traceback)


sys.excepthook = interrupted  # the scripts import common before their slow imports


def prepare_command(dataset):
    """The prepare.py command that makes data/DATASET: its own for Tiny Shakespeare, else your text under that name."""
    if dataset in ('shakespeare', 'shakespeare_char'):
        return f"python prepare.py {dataset}"
    return f"python prepare.py text --input=YOUR_TEXT.txt --name={dataset}"


def pick_device(name=''):
    """name, or '' for cuda where there is a GPU, else mps, else cpu; a CUDA device without CUDA fails clearly."""
    import torch
    device = name or ('cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu')
    if device.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={device}, but this torch sees no CUDA GPU; use --device=cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as e:
        fail(f"device={device!r} cannot be used ({str(e).splitlines()[0][:100]}); use cpu, cuda, cuda:N or mps")
    return device


def cpu_has_bf16():
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX); False where /proc/cpuinfo cannot tell."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def pick_dtype(dtype, device, decoding=False):
    """The one 'auto' rule of every script: bf16 on CUDA (fp16 where it has no bf16) and MPS; on CPU bf16 where
    the cores have bf16 instructions, float32 elsewhere (emulated bf16 is slower than float32; BENCHMARKS.md
    compares the two). decoding (sample.py, serve.py): float32 on CPU, where a decoding step's products of one
    row per sequence cost more in bf16 autocast than in float32 at the sizes a CPU decodes (BENCHMARKS.md,
    section 7)."""
    if dtype != 'auto':
        return dtype
    import torch
    kind = device.split(':')[0]
    if kind == 'cuda':
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'bfloat16' if kind == 'mps' or (cpu_has_bf16() and not decoding) else 'float32'


def autocast(device, dtype):
    """The mixed-precision context for a dtype name: nothing for float32, else torch.autocast."""
    import torch
    return nullcontext() if dtype == 'float32' else torch.autocast(device.split(':')[0], dtype=getattr(torch, dtype))


def peak_flops(device):
    """The bf16 dense peak FLOP/s of a CUDA device from PEAK_FLOPS by its name, or 0 where none is known."""
    if not device.startswith('cuda'):
        return 0
    import torch
    return next((v for name, v in PEAK_FLOPS.items() if name in torch.cuda.get_device_name(device)), 0)


def atomic_write(path, write):
    """write(file) into path.tmp, flushed to disk, then renamed over path: a reader (or a kill) never sees
    half a file, and the previous one stays intact until the new one is complete. A failed write (a full
    disk) removes its temporary file rather than leave it filling the disk."""
    tmp = path + '.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
