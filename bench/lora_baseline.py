"""SVF against its LoRA baseline on the LM testbed: same data, same loop, same steps.

    python bench/lora_baseline.py [--testbed .testbed/small-s0] [--svf-lr 1e-2 3e-2]
                                  [--lora-lr 1e-3 3e-3] [--skills gcd ...]

For each skill of the testbed, from its base, one run each of:

- **SVF** — z vectors on every MLP and attention matrix, the supervised objective
  (next-token cross-entropy on the gold answers), the settings that trained the README's
  experts (at most 600 steps of 64, validation every 10 steps, patience 25); one run
  per ``--svf-lr`` (default 1e-2 and 3e-2), the one with the best validation score
  reported;
- **LoRA** — peft, rank 16 (α = 32) on the attention projections q, k, v, o (the paper's
  baseline), trained by the same loop with the same data, steps, batches, schedule,
  clipping and early stopping; one run per ``--lora-lr``, the one with the best
  validation score reported.

Prints the trainable numbers of each, the base's and each run's **test** accuracy on the
skill, and the seconds of each training beside a floor measured in the same run (one
forward + backward of the plain base on a batch), so the times compare across hosts.
Writes the table as JSON to ``.bench/lora_baseline.json``. One thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {
    "objective": "supervised",
    "steps": 600,
    "batch_size": 64,
    "lr": 3e-2,
    "eval_every": 10,
    "patience": 25,
    "seed": 0,
}


def _config(testbed: Path) -> Any:
    from shoal.adapt.config import load_adapt_config

    split = {"train": {}, "validation": {"limit": 64}, "test": {}}
    tasks = {
        skill: {
            name: {"type": "testbed", "dir": str(testbed), "skill": skill, "split": name, **extra}
            for name, extra in split.items()
        }
        for skill in ("chain_sum", "spell_backward", "gcd")
    }
    return load_adapt_config(
        {
            "base": str(testbed / "base"),
            "tasks": tasks,
            "matrices": {"mlp": True, "attention": True},
            "train": TRAIN,
        },
        root=ROOT,
    )


def _test_score(model: Any, task: Any, tokenizer: Any) -> float:
    return float(np.mean(task.score(model, tokenizer)))


def _floor(model: Any, tokenizer: Any, task: Any) -> float:
    """Seconds of one forward + backward of the plain base on a batch of 64 train rows."""
    from shoal.adapt.train import pad_right

    rows = task.examples[:64]
    p = [tokenizer(e["prompt"])["input_ids"] for e in rows]
    a = [tokenizer(" " + str(e["answer"]), add_special_tokens=False)["input_ids"] for e in rows]
    ids, _, attn = pad_right(p, a, tokenizer.pad_token_id)
    times = []
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=attn, labels=ids).loss.backward()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return min(times[1:])


def main() -> None:
    """Train SVF and LoRA per skill, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=ROOT / ".testbed" / "small-s0")
    parser.add_argument("--svf-lr", type=float, nargs="+", default=[1e-2, 3e-2])
    parser.add_argument("--lora-lr", type=float, nargs="*", default=[1e-3, 3e-3])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "lora_baseline.json")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skills", nargs="+", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    import shoal.executors.testbed_task  # noqa: F401 - registers `type: testbed`
    from shoal.adapt.lora import wrap_lora
    from shoal.adapt.train import build_tasks, load_wrapped, train_expert

    config = _config(args.testbed.resolve())
    svf, tokenizer = load_wrapped(config)
    train = build_tasks(config, tokenizer, "train")
    val = build_tasks(config, tokenizer, "validation")
    test = build_tasks(config, tokenizer, "test")
    skills = args.skills or list(config.tasks)

    def plain() -> Any:
        return AutoModelForCausalLM.from_pretrained(config.resolve(config.base)).eval()

    floor = _floor(plain(), tokenizer, train[skills[0]])
    print(f"floor: one forward + backward of the base on 64 rows: {floor * 1e3:.1f} ms")
    rows = []
    for skill in skills:
        svf.reset_z()
        base = _test_score(svf.model, test[skill], tokenizer)
        row: dict[str, Any] = {"skill": skill, "base_test": base, "svf_runs": [], "lora": []}
        for lr in args.svf_lr:
            svf.reset_z()
            opts = config.train.model_copy(update={"lr": lr})
            res = train_expert(svf, tokenizer, train[skill], val[skill], opts, False)
            with svf.cached():
                svf_test = _test_score(svf.model, test[skill], tokenizer)
            row["svf_runs"].append(
                {
                    "lr": lr,
                    "trainable": svf.num_trainable(),
                    "test": svf_test,
                    "validation": res.best_score,
                    "best_step": res.best_step,
                    "seconds": res.seconds,
                }
            )
        row["svf"] = max(row["svf_runs"], key=lambda r: r["validation"])
        for lr in args.lora_lr:
            lora = wrap_lora(plain(), rank=args.rank, seed=0)
            opts = config.train.model_copy(update={"lr": lr})
            lres = train_expert(lora, tokenizer, train[skill], val[skill], opts, False)
            row["lora"].append(
                {
                    "lr": lr,
                    "trainable": lora.num_trainable(),
                    "test": _test_score(lora.model, test[skill], tokenizer),
                    "validation": lres.best_score,
                    "best_step": lres.best_step,
                    "seconds": lres.seconds,
                }
            )
        s = row["svf"]
        line = (
            f"{skill:<15} base {100 * base:5.1f}  SVF lr {s['lr']:g} {100 * s['test']:5.1f} "
            f"({s['trainable']:,} numbers, {s['seconds']:.0f} s = "
            f"{s['seconds'] / floor:,.0f} floors)"
        )
        if row["lora"]:
            best = max(row["lora"], key=lambda r: r["validation"])
            row["lora_best"] = best
            line += (
                f"  LoRA r{args.rank} lr {best['lr']:g} {100 * best['test']:5.1f} "
                f"({best['trainable']:,} numbers, {best['seconds']:.0f} s = "
                f"{best['seconds'] / floor:,.0f} floors)"
            )
        rows.append(row)
        print(line, flush=True)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"floor_seconds": floor, "rows": rows}, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
