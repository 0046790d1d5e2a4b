"""torch.compile train-step benchmark, run by the suite as a subprocess so that a slow or failing
compile can be cut off by a time limit without taking the run down.

    python -m bench.compile_worker --preset digits --folder DIR --batch 64 --repeats 5 --window 1.5

Prints one JSON line: compile_s (the first compiled step, compile included), eager and
compiled images/s per repeat (measured alternately in this process, same weights, batch,
thread count and AdamW settings).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", required=True)
    p.add_argument("--folder", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--window", type=float, default=1.5)
    p.add_argument("--min-steps", type=int, default=2)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from bench.artifacts import torch_model
    from bench.stats import rotated, time_calls
    from model.vit import PRESETS

    torch.set_num_threads(args.threads)
    c = PRESETS[args.preset]
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, c.channels, c.image_size, c.image_size), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, c.num_classes, args.batch).astype(np.int64))

    base = torch_model(args.preset, args.folder).train()
    eager, compiled_src = base, copy.deepcopy(base)
    compiled = torch.compile(compiled_src)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-8, weight_decay=0.01) for m in (eager, compiled_src)}

    def step(model, params_owner):
        opt = opts[params_owner]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    started = time.perf_counter()
    step(compiled, compiled_src)  # compiles forward and backward
    compile_s = time.perf_counter() - started
    for _ in range(2):
        step(compiled, compiled_src)
        step(eager, eager)

    fns = {"eager": lambda: step(eager, eager), "compiled": lambda: step(compiled, compiled_src)}
    out = {"eager": [], "compiled": []}
    for r in range(args.repeats):
        for name in rotated(list(fns), r):
            times = time_calls(fns[name], args.window, args.min_steps)
            out[name].append(len(times) * args.batch / sum(times))
    print(json.dumps({"compile_s": compile_s, **out, "torch": torch.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
