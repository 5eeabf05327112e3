"""``python -m collapse_core bench gpu`` (also ``scripts/gpu_check.sh``): the GPU path, checked.

1. Probe SmolLM2 on the CPU in fp32: the reference every stored metric is compared with.
2. Probe it on CUDA in fp32 (weights loaded in fp32, TF32 off) and in bf16 (what
   ``device = "auto"`` uses on a GPU), each into its own scratch DB (precision is not part of
   the probe cache key, so one DB would return the CPU result as a cache hit).
3. Run one LoRA SFT stage of the pipeline on CUDA (in-repo sample data) and check that it
   committed with a finite training loss that went down, and that the metrics it stored for the
   starting checkpoint are within the bf16 tolerance of the CPU fp32 probe.

Per-layer metrics are compared as |gpu − cpu| <= atol + rtol·|cpu| (:data:`TOLERANCES`; fp32
differs only by reduction order, bf16 keeps 8 mantissa bits, so spectra-derived metrics move by
a few per cent). Batch sizes come from the free GPU memory (:func:`batch_size_for_memory`).
On a machine without CUDA it stops at once with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from ..errors import CollapseError

# (rtol, atol) per precision, for every per-layer metric both probes store.
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (2e-3, 1e-4), "bf16": (0.08, 0.03)}
PROBE_SET = "general"


def batch_size_for_memory(
    free_bytes: int,
    n_layers: int,
    d_model: int,
    seq_len: int,
    vocab: int,
    bytes_per_value: int,
    training: bool = False,
    cap: int = 256,
) -> int:
    """Largest power-of-two batch whose activations fit in half of ``free_bytes``.

    Per sequence: probing keeps every layer's hidden states ((L+1)·T·d values) plus ~4 layers'
    worth of transient attention/MLP buffers and the fp32 logits (T·V·4 bytes); training keeps
    ~16 values per (layer, token, channel) for the backward pass plus logits and their gradient
    (T·V·8 bytes). Estimates, not measurements: half the free memory is left as headroom.
    """
    per_value = (16 * n_layers if training else n_layers + 5) * seq_len * d_model
    logits = seq_len * vocab * (8 if training else 4)
    per_sequence = per_value * bytes_per_value + logits
    fits = max(1, int(0.5 * free_bytes // max(1, per_sequence)))
    return int(min(cap, 2 ** int(math.log2(fits))))


def _probe_into(db: Path, device: str, dtype: torch.dtype, tokens: int, prompts: int) -> tuple:
    from ..models import load_model
    from ..probing import ProbeConfig, probe
    from ..store import Store

    loaded = load_model("smollm2", device="cpu", verbose=False)
    if device == "cuda":
        loaded.model.to(device="cuda", dtype=dtype)
        loaded.device = torch.device("cuda")
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        config = loaded.model.config
        bs = batch_size_for_memory(free, loaded.n_layers, loaded.d_model, tokens,
                                   int(config.vocab_size), torch.finfo(dtype).bits // 8)  # fmt: skip
    else:
        bs = 16
    store = Store(db)
    started = time.perf_counter()
    result = probe(loaded, PROBE_SET, ProbeConfig(max_length=tokens, batch_size=bs,
                                                  max_prompts=prompts), store=store)  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    return store.layer_metrics(result.probe_key), bs, seconds


def compare(reference: pd.DataFrame, other: pd.DataFrame, rtol: float, atol: float) -> pd.DataFrame:
    """Per metric: layers compared, worst |Δ|, worst |Δ|/(atol + rtol·|ref|) ('ratio' <= 1 passes)."""
    joined = reference.merge(other, on=["layer", "metric"], suffixes=("_cpu", "_gpu")).dropna()
    joined["abs_diff"] = (joined["value_gpu"] - joined["value_cpu"]).abs()
    joined["ratio"] = joined["abs_diff"] / (atol + rtol * joined["value_cpu"].abs())
    return (
        joined.groupby("metric")
        .agg(layers=("layer", "size"), max_abs_diff=("abs_diff", "max"), ratio=("ratio", "max"))
        .reset_index()
        .sort_values("ratio", ascending=False)
    )


def _training_stage(tmp: Path, batch_size: int, tokens: int, prompts: int) -> dict:
    from ..pipeline import run_study
    from ..runconfig import parse_config
    from ..store import Store

    os.environ["COLLAPSE_RUNS_DIR"] = str(tmp / "runs")
    raw = {
        "run": {"name": "gpu-check", "model": "smollm2", "stages": ["sft"], "seeds": [0],
                "data_source": "sample", "device": "cuda"},
        "train": {"steps": 12, "batch_size": batch_size, "n_train": 48, "max_length": 128},
        "eval": {"n_heldout": 8, "n_ood": 16, "plasticity_steps": 0, "probe_sets": [PROBE_SET],
                 "probe_max_prompts": prompts, "generation_n": 0, "queue_embeddings": False},
        "probe": {"max_length": tokens},
    }  # fmt: skip
    store = Store(tmp / "train.duckdb")
    started = time.perf_counter()
    study = run_study(parse_config(raw, where="bench gpu"), store)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stages = store.query(
        "SELECT s.stage_index, s.train_loss_first, s.train_loss_last, s.seconds FROM stages s "
        "JOIN runs r USING (run_id) WHERE r.study_id = ? ORDER BY 1",
        [study],
    )
    base = store.query(
        "SELECT m.layer, m.metric, m.value FROM layer_metrics m JOIN stages s USING "
        "(checkpoint_id) WHERE s.stage_index = 0 ORDER BY 2, 1"
    )
    return {"stages": stages, "base_metrics": base, "seconds": seconds}


def bench_gpu(args: argparse.Namespace) -> int:
    """Run the checks above and print one table per precision; exit 1 if any is out of tolerance."""
    if not torch.cuda.is_available():
        raise CollapseError(
            f"bench gpu needs a CUDA GPU, and torch {torch.__version__} sees none on this machine "
            "(install the CUDA build of the pinned torch on a GPU machine); nothing was run"
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tokens, prompts = args.tokens, args.prompts
    name = torch.cuda.get_device_name(0)
    free, total = torch.cuda.mem_get_info()
    print(f"bench gpu: {name}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free; SmolLM2, probe "
          f"set {PROBE_SET}, {prompts} prompts x {tokens} tokens")  # fmt: skip
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        cpu, cpu_bs, cpu_s = _probe_into(tmp / "cpu.duckdb", "cpu", torch.float32, tokens, prompts)
        print(f"\ncpu fp32 probe: batch {cpu_bs}, {cpu_s:.1f} s (reference)")
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            metrics, bs, secs = _probe_into(tmp / f"{label}.duckdb", "cuda", dtype, tokens, prompts)
            rtol, atol = TOLERANCES[label]
            table = compare(cpu, metrics, rtol, atol)
            ok = bool((table["ratio"] <= 1).all())
            failed |= not ok
            print(f"\ncuda {label} probe: batch {bs} (from free memory), {secs:.1f} s "
                  f"({cpu_s / secs:.1f}x cpu); tolerance rtol {rtol} atol {atol}: "
                  f"{'PASS' if ok else 'FAIL'}")  # fmt: skip
            print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        free, _ = torch.cuda.mem_get_info()
        train_bs = batch_size_for_memory(free, 30, 576, 128, 49152, 2, training=True, cap=32)
        run = _training_stage(tmp, train_bs, tokens, prompts)
        stages = run["stages"]
        losses_ok = (
            len(stages) == 2
            and math.isfinite(float(stages["train_loss_last"].iloc[1]))
            and float(stages["train_loss_last"].iloc[1]) < float(stages["train_loss_first"].iloc[1])
        )
        base_ok = bool((compare(cpu, run["base_metrics"], *TOLERANCES["bf16"])["ratio"] <= 1).all())
        failed |= not (losses_ok and base_ok)
        print(f"\ncuda training stage (sft, 12 LoRA steps, batch {train_bs} from free memory): "
              f"{run['seconds']:.1f} s for probe+evals+stage; loss "
              f"{stages['train_loss_first'].iloc[-1]:.3f} -> {stages['train_loss_last'].iloc[-1]:.3f} "
              f"{'PASS' if losses_ok else 'FAIL'}; its stored base-checkpoint metrics within the bf16 "
              "tolerance of the cpu fp32 probe: "
              f"{'PASS' if base_ok else 'FAIL'}")  # fmt: skip
    print(f"\nbench gpu: {'FAIL' if failed else 'PASS'}")
    return 1 if failed else 0
