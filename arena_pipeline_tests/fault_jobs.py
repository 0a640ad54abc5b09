"""Stand-in job programs that fail the way real GPU jobs fail (run as `python -m arena_pipeline_tests.fault_jobs MODE`).

Each mode writes to stderr what PyTorch / CUDA / the kernel leave behind, so the launcher's cause detection can
be tested without a GPU:

- ``cuda_oom``: the traceback of ``torch.OutOfMemoryError: CUDA out of memory`` (exit 1)
- ``cuda_error``: ``RuntimeError: CUDA error: device-side assert triggered`` (exit 1)
- ``host_oom``: a Python ``MemoryError`` (exit 1)
- ``self_kill``: the job kills itself with SIGKILL, as the kernel's OOM killer would; under ``accelerate launch``
  the launcher process then exits with code 1 and names the signal on its stderr
"""

import os
import signal
import sys

CUDA_OOM = """\
Traceback (most recent call last):
  File "/app/gpu_jobs/train.py", line 161, in fit_neural
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
  File "/usr/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1775, in _call_impl
    return forward_call(*args, **kwargs)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.52 GiB. GPU 0 has a total capacity of 79.19 GiB \
of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the allocated \
memory 74.03 GiB is allocated by PyTorch, and 2.61 GiB is reserved by PyTorch but unallocated. If reserved but \
unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.
"""

CUDA_ERROR = """\
Traceback (most recent call last):
  File "/app/gpu_jobs/train.py", line 161, in fit_neural
    loss = soft_cross_entropy(logits, batch["targets"], batch["weight"])
RuntimeError: CUDA error: device-side assert triggered
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1
"""


def main() -> None:
    mode = sys.argv[1]
    print(f"fault job: {mode}", flush=True)
    for i in range(50):  # noise before the cause: only the tail should reach the failure message
        print(f"step {i} ok", file=sys.stderr)
    if mode == "cuda_oom":
        sys.stderr.write(CUDA_OOM)
        sys.exit(1)
    if mode == "cuda_error":
        sys.stderr.write(CUDA_ERROR)
        sys.exit(1)
    if mode == "host_oom":
        sys.stderr.flush()
        raise MemoryError()
    if mode == "self_kill":
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit(f"unknown fault mode {mode!r}")


if __name__ == "__main__":
    main()
