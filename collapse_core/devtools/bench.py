"""Benchmarks: side-by-side ratios measured in one run (never timed unit tests).

``python -m collapse_core bench probe`` compares, on the same batches of the same model:

(a) the bare forward pass, (b) our streaming probe (capture + all metrics, no DB write),
(c) the naive way: ``output_hidden_states=True``, keep every layer's states of every token,
then a full SVD per layer.

Each variant runs in its own child process so that its peak resident memory (ru_maxrss, which
only grows within a process) can be measured; we report the peak *above* the memory the process
had after loading the model and one warm-up batch. Times exclude model loading.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

VARIANTS = ("forward", "probe", "naive")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bench_texts(tokenizer, n_prompts: int, n_tokens: int) -> tuple[list[str], list[list[int]]]:
    """n_prompts windows of exactly n_tokens tokens cut from our mixed probe texts."""
    from ..probesets import load_probe_set

    stream: list[int] = []
    texts = load_probe_set("mixed").texts
    i = 0
    while len(stream) < n_prompts * n_tokens:
        stream.extend(tokenizer(texts[i % len(texts)] + "\n")["input_ids"])
        i += 1
    ids = [stream[k * n_tokens : (k + 1) * n_tokens] for k in range(n_prompts)]
    return [tokenizer.decode(x) for x in ids], ids


def run_variant(variant: str, model_spec: str, n_prompts: int, n_tokens: int, batch: int,
                device: str) -> dict:  # fmt: skip
    """Run one variant in this process and return its wall time and extra peak memory."""
    from .. import metrics as M
    from ..models import load_model
    from ..probing import ProbeConfig, run_capture, summarise

    torch.manual_seed(0)
    loaded = load_model(model_spec, device=device, verbose=False)
    model, tok = loaded.model, loaded.tokenizer
    _, ids = _bench_texts(tok, n_prompts, n_tokens)
    batches = [torch.tensor(ids[i : i + batch]) for i in range(0, len(ids), batch)]
    dev = loaded.device
    with torch.no_grad():
        model(input_ids=batches[0].to(dev), use_cache=False)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    base_rss = _peak_rss_bytes()
    start = time.perf_counter()
    if variant == "forward":
        with torch.no_grad():
            for b in batches:
                out = model(input_ids=b.to(dev), use_cache=False)
                del out
    elif variant == "probe":
        # Exactly the probe's code path, on texts that tokenise to the same windows.
        config = ProbeConfig(max_length=n_tokens, batch_size=batch)
        capture, _ = run_capture(loaded, ids, config)
        summarise(capture, config)
    elif variant == "naive":
        states: list[list[torch.Tensor]] = []
        with torch.no_grad():
            for b in batches:
                out = model(input_ids=b.to(dev), output_hidden_states=True, use_cache=False)
                if not states:
                    states = [[] for _ in out.hidden_states]
                for layer, h in enumerate(out.hidden_states):
                    states[layer].append(h[:, 1:].reshape(-1, h.shape[-1]).float().cpu())
                del out
        for layer_states in states:
            x = torch.cat(layer_states)
            x = x - x.mean(0)
            sv = torch.linalg.svd(x, full_matrices=False).S.numpy()
            M.effective_rank_from_singular_values(sv)
    else:
        raise ValueError(variant)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        extra = torch.cuda.max_memory_allocated() - base_mem
    else:
        extra = max(_peak_rss_bytes() - base_rss, 0)
    return {"variant": variant, "seconds": seconds, "extra_peak_bytes": extra, "device": str(dev)}


def bench_probe(args: argparse.Namespace) -> int:
    """Run the three variants in child processes and print the ratios."""
    results: dict[str, dict] = {}
    # Interleaved repeats, best of each: the machine is shared, so a single run of each variant
    # can land on a busier moment than its neighbour.
    for rep in range(args.repeats):
        for variant in VARIANTS:
            cmd = [
                sys.executable, "-m", "collapse_core.devtools.bench", "_variant", variant, args.model,
                str(args.prompts), str(args.tokens), str(args.batch_size), args.device,
            ]  # fmt: skip
            print(f"running {variant} (repeat {rep + 1}/{args.repeats}) ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(out.stdout.strip().splitlines()[-1])
            best = results.get(variant)
            if best is None or result["seconds"] < best["seconds"]:
                results[variant] = result
    fwd, ours, naive = (results[v] for v in VARIANTS)
    mb = 1024 * 1024
    print(
        f"\nbench probe: {args.model}, {args.prompts} prompts x {args.tokens} tokens, "
        f"batch {args.batch_size}, device {fwd['device']}"
    )
    print(f"{'variant':<10}{'seconds':>10}{'extra peak MB':>16}")
    for r in (fwd, ours, naive):
        print(f"{r['variant']:<10}{r['seconds']:>10.2f}{r['extra_peak_bytes'] / mb:>16.1f}")
    print(f"\nprobe / forward time        {ours['seconds'] / fwd['seconds']:.3f}x  (goal <= 1.15)")
    print(f"naive / probe time          {naive['seconds'] / ours['seconds']:.2f}x  (goal >= 2)")
    ratio = naive["extra_peak_bytes"] / max(ours["extra_peak_bytes"], 1)
    print(f"naive / probe extra memory  {ratio:.1f}x  (goal >= 5)")
    return 0


def main(args: argparse.Namespace) -> int:
    """Dispatch ``python -m collapse_core bench WHAT``."""
    if args.what == "probe":
        return bench_probe(args)
    if args.what == "train":
        from .bench_train import bench_train

        return bench_train(args)
    if args.what == "faults":
        from .faults import bench_faults

        return bench_faults(args)
    if args.what == "app":
        from .bench_app import bench_app

        return bench_app(args)
    raise SystemExit(f"unknown benchmark {args.what}")


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "_variant":
        _, _, name, spec, n_p, n_t, bs, dev = sys.argv
        print(json.dumps(run_variant(name, spec, int(n_p), int(n_t), int(bs), dev)))
